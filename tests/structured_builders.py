"""Shared builders of the structured step tests: settings, rows, the tiny model loaded as an oracle, a fake
generation backend, and teacher-forced log-probs.
"""

from __future__ import annotations

import math
import re

import torch
from transformers import AutoModelForCausalLM

from ebft import losses
from ebft.data.structured import prompt_row
from ebft.structured.rollout import Completion, Sampling
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import microbatch

SEQ_LEN = 256
MAX_COMPLETION = 64


def structured_settings(tok, **over) -> StructuredSettings:
    """StructuredSettings for the tiny model with every knob at a plain default; keyword arguments replace fields
    (``tok`` gives the default stop token; None when ``sampling`` is passed)."""
    if "sampling" not in over:
        over["sampling"] = Sampling(temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    base = {
        "num_generations": 3,
        "max_completion_length": MAX_COMPLETION,
        "adaptive_max_tokens": False,
        "gt_length_multiplier": 1.5,
        "embed_method": "last_token",
        "feature_norm": "per_layer",
        "use_whitening": False,
        "whitening_space": "feature",
        "alignment_coef": 1.0,
        "diversity_coef": 1.0,
        "scale_rewards": "group",
        "loss_type": "grpo",
        "eps_low": 0.2,
        "eps_high": 0.2,
        "num_iterations": 1,
        "mask_truncated_completions": False,
        "skip_zero_advantage_batches": False,
        "is_correction": False,
        "is_bounds": (1 / 3.0, 3.0),
        "rl_coef": 1.0,
        "ce_coef": 0.0,
        "sequence_len": SEQ_LEN,
    }
    base.update(over)
    return StructuredSettings(**base)


def make_row(tok, prompt, ground_truth, remaining=()):
    """A prompt row built by the data layer from a prompt, its ground truth and any remaining turns."""
    return prompt_row(
        {"prompt": prompt, "ground_truth": ground_truth, "remaining_turns": list(remaining)},
        tok,
        sequence_len=SEQ_LEN,
        max_completion_length=MAX_COMPLETION,
        chat_template_kwargs=None,
        source="test",
    )


def user_message(text):
    """A user chat message."""
    return {"role": "user", "content": text}


def assistant_message(text):
    """An assistant chat message."""
    return {"role": "assistant", "content": text}


def encode(tok, text):
    """Token ids of text, without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def load_model(model_dir, lm_head_scale: float = 1.0):
    """The tiny model in float32, its LM head optionally scaled for a peakier policy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.float()
    if lm_head_scale != 1.0:
        with torch.no_grad():  # a peakier policy than the near-uniform random init
            model.lm_head.weight.mul_(lm_head_scale)
    return model


class FakeBackend:
    """Deterministic, prompt-dependent completions that say where they came from; records every call.

    The reply to a context is ``re {tag} s{j} t{turn}``: ``tag`` is the first word of the context's first
    user message, ``turn`` the number of replies already in the context, ``j`` the sample index (first
    turn) or the sample index of the replies already there. Completions end with EOS unless ``unfinished``
    says otherwise for (tag, j, turn); they are cut at ``max_tokens``.
    """

    REPLY = re.compile(r"re (\w+) s(\d+) t(\d+)")

    def __init__(self, tok, unfinished=()):
        self.tok = tok
        self.calls: list[dict] = []
        self.unfinished = set(unfinished)

    def generate(self, prompts, n, max_tokens, seeds):
        self.calls.append(
            {"prompts": [list(p) for p in prompts], "n": n, "max_tokens": list(max_tokens), "seeds": list(seeds)}
        )
        out = []
        for prompt, cap in zip(prompts, max_tokens, strict=True):
            text = self.tok.decode(prompt, skip_special_tokens=False)
            tag = re.search(r"<\|user\|>\n(\w+)", text).group(1)
            earlier = self.REPLY.findall(text)
            group = []
            for j in range(n):
                sample = int(earlier[-1][1]) if earlier else j
                turn = len(earlier)
                ids = encode(self.tok, f"re {tag} s{sample} t{turn}")
                finished = (tag, sample, turn) not in self.unfinished
                if finished:
                    ids = [*ids, self.tok.eos_token_id]
                group.append(Completion(ids=tuple(ids[:cap]), finished=finished and len(ids) <= cap))
            out.append(group)
        return out

    def sync(self, model, step):
        pass

    def close(self):
        pass


def teacher_forced_logp(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) for t = 1..T-1 from a plain forward of the unpadded sequence: [T - 1]."""
    ids = torch.tensor([seq])
    logits = model(ids).logits[0, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]


def flat_grad(params):
    """All parameters' gradients as one flat vector (zeros where none); clears them."""
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return out


def run_step(model, buffer, s, tok, splits, ce_tokens=0):
    """microbatch over ``splits`` (lists of completion indices) with step-global norms; returns their statistics."""
    norm = losses.LossNorm(
        sequences=len(buffer.samples),
        tokens=sum(sum(q.loss_mask[1:]) for q in buffer.samples),
        max_completion_length=s.max_completion_length,
        micro_batches=len(splits),
    )
    out = []
    for idx in splits:
        ce_rows = [i // s.num_generations for i in idx if i % s.num_generations == 0]
        out.append(microbatch(model, buffer, idx, ce_rows, s, norm, ce_tokens, tok, pad_id=tok.pad_token_id))
    return out


def oracle_truncated_dist(z: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """[V] log-probs of top-k, then top-p, then min-p of softmax(z), each cut renormalised, computed on the
    sorted distribution (float64); -inf outside the kept set."""
    order = torch.argsort(z.double(), descending=True)
    zs = z.double()[order]
    keep = torch.ones_like(zs, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False  # the k largest
    if top_p < 1.0:
        p = torch.softmax(zs.masked_fill(~keep, -math.inf), -1)
        before = torch.cumsum(p, 0) - p  # mass of the more likely kept tokens
        keep &= before < top_p  # smallest prefix reaching top_p (the crossing token stays)
    if min_p > 0.0:
        p = torch.softmax(zs.masked_fill(~keep, -math.inf), -1)
        keep &= p >= min_p * p.max()
    logp = torch.full_like(zs, -math.inf)
    logp[order[keep]] = torch.log_softmax(zs[keep], -1)
    return logp
