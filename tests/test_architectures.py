"""Per-architecture oracle for strided mode (docs/design.md §7.1): on every supported architecture the packed row
computes, for every generated token, exactly what the model computes on that block alone, x[:c_k] +
block, with its own attention implementation (sliding windows per layer, soft-capping, scaling, GQA).

The tiny configs make each feature bite: windows of 4 tokens with prefixes of up to 12, blocks of 5
tokens (so a block's last token no longer sees its first one), soft-caps of 2 and 3 where raw scores
and logits exceed them, a query_pre_attn_scalar that is not the head dimension, 4 query heads over 2
key/value heads. Without the per-layer handling the packed logits differ by 0.16-0.35 (measured).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ebft.attention.strided import build_plan, strided_backend, strided_forward
from ebft.attention.strided_layout import build_layout
from ebft.attention.support import VERIFIED, check_strided_architecture, strided_problems
from ebft.errors import ConfigError
from ebft.losses import token_logprobs
from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.parts import backbone_of, output_head
from ebft.strided.generate import generate_blocks, pack

ATOL = 1e-5
VOCAB, WINDOW = 37, 4
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # Weights 5x the usual 0.02 so attention scores and logits are large enough for every feature to matter.
    "initializer_range": 0.1,
}
# name -> (transformers config class, its arguments). README "Supported architectures" lists these model types.
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    # Layers from max_window_layers on slide; layer 0 stays global.
    "qwen2-sliding": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "qwen3-sliding": (
        "Qwen3Config",
        {"head_dim": 8, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    ),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    # Alternating local/global layers, attention and final logit soft-capping, scores scaled by 5**-0.5.
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 8,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 5,
        },
    ),
    # layer_types local/global/local/global; local layers use their own rope base.
    "gemma3": (
        "Gemma3TextConfig",
        {
            "head_dim": 8,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "query_pre_attn_scalar": 5,
            "rope_local_base_freq": 100.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "phi3": ("Phi3Config", {"sliding_window": WINDOW}),
    "olmo2": ("Olmo2Config", {}),
    # Logits multiplied by logit_scale after the LM head; Cohere-2 also alternates local and global layers.
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),
    "cohere2": (
        "Cohere2Config",
        {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"] * 2, "logit_scale": 0.5},
    ),
    # Scores scaled by attention_multiplier, logits divided by logits_scaling.
    "granite": (
        "GraniteConfig",
        {"attention_multiplier": 0.3, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0},
    ),
}
LENGTHS, STRIDE, CONTEXT, GEN, SAMPLES = [19, 13], 3, 3, 5, 2


def build_model(name: str):
    import transformers

    cls, extra = ARCHITECTURES[name]
    config = getattr(transformers, cls)(**COMMON, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param, build_model(request.param)


@pytest.fixture(scope="module")
def batch():
    """Two documents (19 and 13 tokens, right padded), their layout and random rollouts [D, n, K, g]."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for d, n in enumerate(LENGTHS):
        ids[d, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
    lay = build_layout(
        torch.tensor(LENGTHS),
        torch.full((len(LENGTHS),), -1),
        ids.shape[1],
        stride=STRIDE,
        context_length=CONTEXT,
        gen_len=GEN,
        min_completion_prefix=0,
        n=SAMPLES,
    )
    # Anchors 3, 6, 9, 12 (doc 0: 12 + 5 <= 19) and 3, 6 (doc 1: 9 + 5 > 13): prefixes up to 12 > window 4.
    assert lay.anchors[0].tolist() == [3, 6, 9, 12] and lay.valid[1].tolist() == [True, True, False, False]
    tokens = torch.randint(3, VOCAB, (len(LENGTHS), SAMPLES, lay.k, GEN), generator=gen)
    return ids, lay, tokens


def blocks(lay):
    """(d, i, k, anchor) of every valid block and sample."""
    for d in range(lay.num_docs):
        for k in range(int(lay.valid[d].sum())):
            for i in range(lay.n):
                yield d, i, k, int(lay.anchors[d, k])


def packed_hidden(model, ids, lay, tokens, **plan_kwargs):
    with torch.no_grad(), strided_backend(model):
        return strided_forward(
            backbone_of(model), pack(ids, tokens), lay.position_ids(), build_plan(lay, **plan_kwargs)
        )


def test_every_architecture_is_accepted_and_verified(arch, caplog):
    name, model = arch
    check_strided_architecture(model.config)
    assert model.config.model_type in VERIFIED
    assert "not among the architectures verified" not in caplog.text


@pytest.mark.parametrize(
    ("cls", "kwargs", "named"),
    [
        ("GptOssConfig", {}, "model_type: 'gpt_oss' uses attention sinks"),
        ("Llama4TextConfig", {"attention_chunk_size": 8}, "attention_chunk_size: 8"),
        ("Gemma3TextConfig", {"use_bidirectional_attention": True}, "use_bidirectional_attention: true"),
        ("Qwen3NextConfig", {}, "layer_types: ['linear_attention']"),
    ],
)
def test_architectures_strided_mode_cannot_compute_are_refused_naming_the_key(cls, kwargs, named):
    import transformers

    config = getattr(transformers, cls)(**kwargs)
    assert any(named in p for p in strided_problems(config))
    with pytest.raises(ConfigError, match="cannot compute this") as info:
        check_strided_architecture(config)
    assert named in str(info.value)


def test_unverified_architecture_is_accepted_with_a_warning(caplog):
    import transformers

    check_strided_architecture(transformers.Starcoder2Config(sliding_window=WINDOW))
    assert "model_type 'starcoder2' is not among the architectures verified" in caplog.text


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_attention_sinks_stop_the_strided_pass_if_they_get_past_the_load_check():
    """The attention function itself refuses keywords it cannot honour (GPT-OSS passes its sinks as s_aux)."""
    import transformers

    config = transformers.GptOssConfig(
        **{**COMMON, "num_hidden_layers": 2, "intermediate_size": 32},
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=WINDOW,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    lay = build_layout(torch.tensor([10]), torch.tensor([-1]), 10, stride=3, context_length=3, gen_len=2,
                       min_completion_prefix=0, n=1)  # fmt: skip
    with pytest.raises(NotImplementedError, match="attention sinks"):
        packed_hidden(model, ids, lay, torch.randint(3, VOCAB, (1, 1, lay.k, 2)))


@pytest.mark.parametrize("chunk_queries", [7, 256])
def test_packed_logits_and_logprobs_equal_per_block_forwards(arch, batch, chunk_queries):
    """CPU chunked attention: logits of every document and generated token, and the policy pass's
    log-probs (gathered through predictor_index, temperature 0.7), equal the model's own forward."""
    name, model = arch
    ids, lay, tokens = batch
    hidden = packed_hidden(model, ids, lay, tokens, chunk_queries=chunk_queries)
    head = output_head(model)
    with torch.no_grad():
        logits = head(hidden)
        for d, length in enumerate(LENGTHS):
            ref = model(ids[d : d + 1, :length]).logits[0]
            torch.testing.assert_close(logits[d, :length], ref, atol=ATOL, rtol=0)
        S = lay.total_len
        rows = (lay.predictor_index() + torch.arange(lay.num_docs)[:, None, None, None] * S).reshape(-1)
        logp = token_logprobs(hidden.reshape(-1, hidden.shape[-1])[rows], tokens.reshape(-1), head, temperature=0.7)
        logp = logp.reshape(tokens.shape)
        for d, i, k, c in blocks(lay):
            ref = model(torch.cat([ids[d, :c], tokens[d, i, k]])[None]).logits[0]
            torch.testing.assert_close(logits[d, lay.gen_index()[i, k]], ref[c:], atol=ATOL, rtol=0)
            ref_logp = (ref[c - 1 : c - 1 + GEN] / 0.7).log_softmax(-1).gather(-1, tokens[d, i, k][:, None])[:, 0]
            torch.testing.assert_close(logp[d, i, k], ref_logp, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_block_mask_forward_equals_per_block_forwards(arch, batch):
    """The CUDA path's BlockMasks (one per window) and soft-capping score_mod, run uncompiled on CPU."""
    name, model = arch
    ids, lay, tokens = batch
    logits = output_head(model)(packed_hidden(model, ids, lay, tokens, use_flex=True))
    with torch.no_grad():
        for d, i, k, c in blocks(lay):
            ref = model(torch.cat([ids[d, :c], tokens[d, i, k]])[None]).logits[0, c:]
            torch.testing.assert_close(logits[d, lay.gen_index()[i, k]], ref, atol=ATOL, rtol=0)


def test_feature_pass_equals_per_block_hidden_states(arch, batch):
    """The frozen feature network over packed rows: hidden states 1, 2 and 4 (final, post-norm) of every
    generated token and of the ground-truth windows equal the block's own output_hidden_states."""
    name, model = arch
    ids, lay, tokens = batch
    layers = [1, 2, 4]
    features = FeatureNetwork(model, layers)
    got = features(pack(ids, tokens), lay.position_ids(), build_plan(lay))
    with torch.no_grad():
        for d, i, k, c in blocks(lay):
            ref = model(torch.cat([ids[d, :c], tokens[d, i, k]])[None], output_hidden_states=True).hidden_states
            for j, layer in enumerate(layers):
                torch.testing.assert_close(got[j][d, lay.gen_index()[i, k]], ref[layer][0, c:], atol=ATOL, rtol=0)
        for d, length in enumerate(LENGTHS):
            ref = model(ids[d : d + 1, :length], output_hidden_states=True).hidden_states
            for j, layer in enumerate(layers):
                torch.testing.assert_close(got[j][d, :length], ref[layer][0], atol=ATOL, rtol=0)


def test_cached_greedy_generation_equals_per_block_recompute(arch, batch):
    """KV-cached block-parallel decoding (prefill + decode steps through the strided attention) at T=0
    == greedy decoding of each block from x[:c_k] with the model's own full forward."""
    name, model = arch
    ids, lay, _ = batch
    tokens = generate_blocks(model, ids, lay, temperature=0.0)
    with torch.no_grad():
        for d, i, k, c in blocks(lay):
            seq = ids[d, :c]
            for _ in range(GEN):
                seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
            assert tokens[d, i, k].tolist() == seq[c:].tolist(), (name, d, i, k)


def test_readme_lists_exactly_the_tested_architectures():
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### Supported architectures (strided mode)", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"^- `([a-z0-9_]+)`", section, flags=re.MULTILINE))
    import transformers

    tested = {getattr(transformers, cls)().model_type for cls, _ in ARCHITECTURES.values()}
    assert listed == tested


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_other_modes_score_tokens_with_the_models_own_logits(name):
    """Structured policy log-probs and evaluation CE go through output_head too: with final soft-capping
    or logit scaling they equal log_softmax of the model's own logits."""
    from types import SimpleNamespace

    from ebft.data.collate import collate_documents
    from ebft.evaluate.strided import _token_ce
    from ebft.structured.rollout import Sample, Sampling
    from ebft.structured.step import policy_logprobs

    model = build_model(name)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]]
    samples = [Sample(q, 2, [False] * 2 + [True] * (len(q) - 2), 0, True, "") for q in seqs]
    settings = SimpleNamespace(sampling=Sampling(), logprob_temperature=1.0)
    batch = collate_documents([{"input_ids": q, "labels": q} for q in seqs], pad_token_id=0)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, samples, settings, pad_id=0)
        nll, mask, _ = _token_ce(model, batch, torch.autocast("cpu", enabled=False))
        own = [model(torch.tensor([q])).logits[0].log_softmax(-1) for q in seqs]
    want = torch.cat([o[torch.arange(1, len(q) - 1), torch.tensor(q[2:])] for o, q in zip(own, seqs, strict=True)])
    torch.testing.assert_close(logp, want, atol=ATOL, rtol=0)
    want_nll = torch.cat([-o[torch.arange(len(q) - 1), torch.tensor(q[1:])] for o, q in zip(own, seqs, strict=True)])
    torch.testing.assert_close(nll[mask], want_nll, atol=ATOL, rtol=0)


def test_gemma2_trains_in_strided_mode_with_per_block_exact_logprobs(tmp_path, tiny_model_dir, tiny_tokenizer):
    """End to end through the CLI on a sliding-window, soft-capped model that has no SDPA path: it loads
    (eager), passes the architecture check, and every log-prob the first step trained on equals the base
    model's own per-block log-prob (windows of 6 with prefixes of up to 56 tokens)."""
    import json
    import shutil

    import transformers
    import yaml
    from conftest import stdlib_texts

    from ebft.cli import main

    tok = tiny_tokenizer
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    _, extra = ARCHITECTURES["gemma2"]
    config = transformers.Gemma2Config(**{**COMMON, **ids, "vocab_size": len(tok)}, **{**extra, "sliding_window": 6})
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    model_dir = tmp_path / "gemma2"
    base.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(4)), encoding="utf-8")
    run = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 8,
            "n_samples_per_prompt": 2,
            "temperature": 0.8,
            "log_rollouts": True,
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}],
        "sequence_len": 64,
        "micro_batch_size": 1,
        "max_steps": 1,
        "bf16": False,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    assert main(["train", str(path)]) == 0

    records = [json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    checked = 0
    with torch.no_grad():
        for record in records:
            doc = torch.tensor(record["input_ids"])
            # Rows of 64 tokens, anchors 8, 16, ..., 56 (c + 8 <= 64): 7 blocks, each of 2 samples.
            assert record["anchors"] == [8, 16, 24, 32, 40, 48, 56]
            for sample in record["samples"]:
                for c, block in zip(record["anchors"], sample, strict=True):
                    tokens = torch.tensor(block["tokens"])
                    logits = base(torch.cat([doc[:c], tokens])[None]).logits[0, c - 1 : c - 1 + 8] / 0.8
                    want = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
                    torch.testing.assert_close(torch.tensor(block["logprobs"]), want, atol=1e-4, rtol=0)
                    checked += 1
    assert checked == 14


def test_evaluate_refuses_what_strided_mode_cannot_compute(tmp_path, tiny_model_dir, capsys):
    """``ebft evaluate`` runs the same load-time check as training, before any weights load."""
    import json
    import shutil

    import yaml

    from ebft.cli import main

    model_dir = tmp_path / "chunked"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_chunk_size": 8}))
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 40}) + "\n", encoding="utf-8")
    run = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run), encoding="utf-8")
    assert main(["evaluate", str(path), "--split", "train"]) == 2
    assert "cannot compute this 'llama' model exactly: attention_chunk_size: 8" in capsys.readouterr().err
