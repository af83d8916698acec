"""Padding-free (packed) feature and policy passes against the padded path and the model's own forward."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from ebft.attention import packed as packing
from ebft.modeling.feature_network import FeatureNetwork
from ebft.structured.forward import training_backend, use_packed
from ebft.structured.rollout import Sample, Sampling
from ebft.structured.scoring import embed
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import policy_logprobs


def _settings(tok, **over) -> StructuredSettings:
    base = {
        "num_generations": 2,
        "max_completion_length": 32,
        "adaptive_max_tokens": False,
        "gt_length_multiplier": 1.5,
        "sampling": Sampling(temperature=0.7, top_p=0.95, stop_token_ids=(tok.eos_token_id,)),
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
        "sequence_len": 256,
    }
    base.update(over)
    return StructuredSettings(**base)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _samples(tok) -> list[Sample]:
    """Single-turn completions of different lengths (one ending in the stop token, one truncated, one
    masked out) and a multi-turn sample whose loss reads two replies in their own contexts."""
    eos = tok.eos_token_id
    p1, p2 = _ids(tok, "import os\n"), _ids(tok, "class Widget(object):\n    def __init__(self):")
    c1, c2, c3 = _ids(tok, "print(x)") + [eos], _ids(tok, " return None  # done"), _ids(tok, "pass")
    single = [
        Sample(p1 + c1, len(p1), [False] * len(p1) + [True] * len(c1), len(p1 + c1) - 1, True, ""),
        Sample(p2 + c2, len(p2), [False] * len(p2) + [True] * len(c2), len(p2 + c2), False, ""),
        Sample(p1 + c3, len(p1), [False] * len(p1 + c3), len(p1 + c3), False, ""),
    ]
    ctx1, r1 = _ids(tok, "user: hi\nassistant:"), _ids(tok, " hello") + [eos]
    ctx2, r2 = ctx1 + r1 + _ids(tok, "\nuser: more\nassistant:"), _ids(tok, " def f(): pass") + [eos]
    multi = Sample(
        ctx2 + r2,
        len(ctx1),
        [False] * len(ctx2 + r2),
        len(ctx2 + r2),
        True,
        "",
        turns=((tuple(ctx1), tuple(r1)), (tuple(ctx2), tuple(r2))),
    )
    return [*single, multi]


def _lora(model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(model, cfg)


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_policy_logprobs_and_gradients_equal_padded(tiny_model_dir, tiny_tokenizer, checkpointing):
    tok = tiny_tokenizer
    s = _settings(tok)
    samples = _samples(tok)
    model = _lora(tiny_model_dir)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert use_packed(model)
    results = {}
    for packed in (False, True):
        # As microbatch does: the packed backend stays selected through backward (checkpointed recompute).
        with training_backend(model) if packed else nullcontext():
            logp, seq, entropy = policy_logprobs(model, samples, s, tok.pad_token_id, with_entropy=True, packed=packed)
            # A loss that weighs every token differently, so a misrouted gradient cannot cancel out.
            weights = torch.linspace(-1.0, 2.0, logp.numel())
            (weights * logp).sum().backward()
        results[packed] = (logp.detach(), seq, entropy.detach(), _grads(model))
    (lp0, seq0, ent0, g0), (lp1, seq1, ent1, g1) = results[False], results[True]
    # Samples with loss tokens: 0 (its stop token included), 1 (truncated), 3 (both replies); 2 is masked out.
    assert seq0.tolist() == seq1.tolist()
    assert set(seq0.tolist()) == {0, 1, 3}
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_logprobs_equal_each_sequence_alone(tiny_model_dir, tiny_tokenizer):
    """Oracle independent of both paths: the model's own plain forward of each view, one at a time."""
    tok = tiny_tokenizer
    s = _settings(tok, sampling=Sampling(temperature=1.0, stop_token_ids=(tok.eos_token_id,)))
    samples = _samples(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    with torch.no_grad():
        logp, seq = policy_logprobs(model, samples, s, tok.pad_token_id, packed=True)
        want = []
        for q in samples:
            views = [(list(c) + list(r), len(c)) for c, r in q.turns] or [(q.sequence, None)]
            for ids, start in views:
                logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                mask = q.loss_mask if start is None else [False] * start + [True] * (len(ids) - start)
                want += [logits[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]]
    torch.testing.assert_close(logp, torch.stack(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "completion_mean", "concat"])
def test_packed_features_equal_padded(tiny_model_dir, tiny_tokenizer, method):
    tok = tiny_tokenizer
    # Every feature_norm on both paths (the padded one must honour it as the packed one does).
    norm = {"last_token": "per_layer", "mean_pooling": "joint", "completion_mean": "none", "concat": "joint"}[method]
    s = _settings(tok, embed_method=method, feature_norm=norm)
    model = _lora(tiny_model_dir)
    features = FeatureNetwork(model, [1, 2, 3])
    seqs = [q.sequence for q in _samples(tok)] + [_ids(tok, "x")]
    prompts = [q.prompt_length for q in _samples(tok)] + [0]
    padded = embed(features, seqs, prompts, s, tok.pad_token_id, batch_size=3, packed=False)
    packed = embed(features, seqs, prompts, s, tok.pad_token_id, batch_size=3, packed=True)
    assert packed.shape == padded.shape == (5, 3 * 64 * (3 if method == "concat" else 1))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_pack_and_unpack_layout_without_sharing():
    row = packing.pack([[5, 6, 7], [], [8, 9]], share_prefixes=False)
    assert row.ids.tolist() == [[5, 6, 7, 8, 9]]
    assert row.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert row.plan.index == [[0, 1, 2], [], [3, 4]]
    assert [(g.offset, g.length, g.context) for g in row.plan.segments] == [(0, 3, ()), (3, 2, ())]
    values = row.ids[..., None].float()  # [1, 5, 1]
    assert packing.unpack(values, row.plan)[..., 0].tolist() == [[5, 6, 7], [0, 0, 0], [8, 9, 0]]


def test_attention_the_packed_backend_cannot_reproduce_runs_padded():
    llama = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    assert packing.unsupported_reason(llama) is None
    windowed = MistralConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, sliding_window=16
    )
    assert "sliding_window=16" in packing.unsupported_reason(windowed)
    unwindowed = MistralConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, sliding_window=None
    )
    assert packing.unsupported_reason(unwindowed) is None
    llama._attn_implementation = "eager"
    assert "'eager'" in packing.unsupported_reason(llama)


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").float().eval()


@pytest.mark.parametrize("packed", [True, False])
def test_predicting_states_of_views_without_loss_tokens_are_empty(tiny_model_dir, packed):
    """No loss token anywhere: no row, and the ids and owners are still integer tensors (the caller indexes
    and gathers with them)."""
    from ebft.structured.forward import predicting_states

    model = _model(tiny_model_dir)
    views = [([5, 6, 7], [False, False, False]), ([5, 8], [False, False])]
    with torch.no_grad():
        states, ids, owner = predicting_states(model, views, 0, packed=packed)
    assert states.shape == (0, model.config.hidden_size)
    assert ids.dtype == owner.dtype == torch.long and ids.numel() == owner.numel() == 0


@pytest.mark.parametrize("packed", [True, False])
def test_a_target_right_after_a_one_token_prompt_is_predicted_by_that_token(tiny_model_dir, packed):
    """A view whose second token is already a loss token (one-token prompt): it is predicted by the hidden
    state of the first token, on both paths."""
    from ebft.structured.forward import predicting_states

    model = _model(tiny_model_dir)
    views = [([9, 10, 11], [False, True, True]), ([9, 12, 13, 14], [False, False, True, True])]
    with torch.no_grad():
        states, ids, owner = predicting_states(model, views, 0, packed=packed)
        alone = [model.model(torch.tensor([seq])).last_hidden_state[0] for seq, _ in views]
    assert ids.tolist() == [10, 11, 13, 14] and owner.tolist() == [0, 0, 1, 1]
    want = torch.stack([alone[0][0], alone[0][1], alone[1][1], alone[1][2]])
    torch.testing.assert_close(states, want, atol=1e-5, rtol=1e-5)


def test_predicting_states_run_under_the_autocast_dtype_asked_for(tiny_model_dir):
    """float16 autocast is honoured, not replaced by the device's default autocast dtype (bfloat16 on CPU):
    float16 keeps 10 mantissa bits to bfloat16's 7, so its states are the closer ones to float32's."""
    from ebft.structured.forward import predicting_states

    model = _model(tiny_model_dir)
    views = [(list(range(5, 40)), [False] * 5 + [True] * 30)]
    with torch.no_grad():
        exact = predicting_states(model, views, 0)[0]
        errors = {
            dtype: (predicting_states(model, views, 0, autocast_dtype=dtype)[0].float() - exact).abs().max()
            for dtype in (torch.float16, torch.bfloat16)
        }
    assert 0 < errors[torch.float16] < errors[torch.bfloat16] / 2
