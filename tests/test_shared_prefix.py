"""Shared-prefix packing: each common prefix computed once, against the padded path, the unshared packed
row and the model's own forward of each sequence alone."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_architectures import ARCHITECTURES, build_model
from test_packed import _settings
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ebft.attention import packed as packing
from ebft.attention.prefix_tree import prefix_tree
from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.parts import backbone_of
from ebft.structured.forward import predicting_states, training_backend, use_packed
from ebft.structured.rollout import Sample, Sampling
from ebft.structured.scoring import embed
from ebft.structured.step import policy_logprobs


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _completion(prompt: list[int], reply: list[int], *, trained: bool = True) -> Sample:
    seq = prompt + reply
    return Sample(seq, len(prompt), [False] * len(prompt) + [trained] * len(reply), len(seq), True, "")


def _batch(tok) -> list[Sample]:
    """Four samples of one prompt (one ending in the stop token, two identical), the same prompt truncated
    to fewer tokens, an unrelated prompt (nothing in common with the rest), and a multi-turn sample whose
    two reply views share the first turn's context."""
    eos = tok.eos_token_id
    prompt = _ids(tok, "def parse(text):\n    lines = text.split()\n")
    replies = [" return lines", " return len(lines)", "    pass", "    pass"]
    group = [_completion(prompt, _ids(tok, r) + ([eos] if k == 0 else [])) for k, r in enumerate(replies)]
    truncated = _completion(prompt[:5], _ids(tok, " x = 1"))
    other = _completion(_ids(tok, "import sys\n"), _ids(tok, "print(sys.argv)"))
    ctx1, r1 = _ids(tok, "user: hi\nassistant:"), _ids(tok, " hello") + [eos]
    ctx2, r2 = ctx1 + r1 + _ids(tok, "\nuser: more\nassistant:"), _ids(tok, " def f(): pass") + [eos]
    turns = ((tuple(ctx1), tuple(r1)), (tuple(ctx2), tuple(r2)))
    multi = Sample(ctx2 + r2, len(ctx1), [False] * len(ctx2 + r2), len(ctx2 + r2), True, "", turns=turns)
    return [*group, truncated, other, multi]


def test_prefix_tree_by_hand():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7], [9, 8], [1, 2, 3, 4], [], [1, 2]]
    nodes, paths = prefix_tree(seqs)
    # Root children in batch order: [1, 2] (shared by 0, 1, 2, 4, 6) and [9, 8]; under [1, 2]: [3] (0, 1, 4)
    # and [7]; under [3]: [4] (0 and its duplicate 4) and [5, 6]. Sequence 6 is exactly the shared [1, 2].
    assert [(n.start, n.length, n.parent) for n in nodes] == [
        (0, 2, None),
        (0, 2, None),
        (2, 1, 0),
        (2, 1, 0),
        (3, 1, 2),
        (3, 2, 2),
    ]
    assert paths == [[0, 2, 4], [0, 2, 5], [0, 3], [1], [0, 2, 4], [], [0]]
    row = packing.pack(seqs)
    # 2 + 2 + 1 + 1 + 1 + 2 = 9 tokens instead of 4 + 5 + 3 + 2 + 4 + 0 + 2 = 20.
    assert row.plan.total == 9
    assert row.ids.tolist() == [[1, 2, 9, 8, 3, 7, 4, 5, 6]]
    assert row.positions.tolist() == [[0, 1, 0, 1, 2, 2, 3, 3, 4]]
    values = row.ids[..., None].float()  # [1, 9, 1]: unpacked, every sequence reads back its own tokens
    want = [q + [0] * (5 - len(q)) for q in seqs]
    assert packing.unpack(values, row.plan)[..., 0].long().tolist() == want
    # Segment [5, 6] (offset 7) sees [1, 2] (offset 0) and [3] (offset 4) in full.
    assert row.plan.segments[5].context == ((0, 2), (4, 1))
    assert row.plan.mask(5, torch.device("cpu")).tolist() == [[True, True, True, True, False], [True] * 5]


def test_tokens_forwarded_are_each_prompt_once_plus_every_completion(tiny_model_dir, tiny_tokenizer):
    """P = 2 prompts x n = 4 completions, Lp = 6, C = 3: the row holds P x (Lp + n x C) = 2 x (6 + 4 x 3) = 36
    tokens, where each sequence whole would be P x n x (Lp + C) = 2 x 4 x 9 = 72."""
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]]
    samples = [_completion(p, [30 + j, 40, 50]) for p in prompts for j in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    s = _settings(tiny_tokenizer)
    with torch.no_grad():
        policy_logprobs(model, samples, s, 0, packed=True)
        policy_logprobs(model, samples, s, 0, packed=True, share_prefixes=False)
    hook.remove()
    assert seen == [torch.Size([1, 36]), torch.Size([1, 72])]


def _model(model_dir, adapter: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    if adapter == "lora":
        cfg = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights=False
        )
        model = get_peft_model(model, cfg)
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_shared_logprobs_entropies_gradients_equal_padded_and_unshared(
    tiny_model_dir, tiny_tokenizer, adapter, checkpointing
):
    tok = tiny_tokenizer
    s = _settings(tok)
    samples = _batch(tok)
    model = _model(tiny_model_dir, adapter)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert use_packed(model)
    results = {}
    for layout in ("padded", "unshared", "shared"):
        # As microbatch does: the packed backend stays selected through backward (checkpointed recompute).
        with training_backend(model) if layout != "padded" else nullcontext():
            logp, seq, entropy = policy_logprobs(
                model,
                samples,
                s,
                tok.pad_token_id,
                with_entropy=True,
                packed=layout != "padded",
                share_prefixes=layout == "shared",
            )
            # Every token weighed differently, so a gradient routed to the wrong copy cannot cancel out.
            weights = torch.linspace(-1.0, 2.0, logp.numel())
            (weights * logp).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results[layout] = (logp.detach(), seq, entropy.detach(), grads)
    lp0, seq0, ent0, g0 = results["padded"]
    assert set(seq0.tolist()) == set(range(len(samples)))
    assert len(g0) > 0
    for layout in ("unshared", "shared"):
        lp, seq, ent, g = results[layout]
        assert seq.tolist() == seq0.tolist()
        torch.testing.assert_close(lp, lp0, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ent0, atol=1e-5, rtol=0)
        assert g.keys() == g0.keys()
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], atol=1e-5, rtol=1e-4, msg=f"{layout} {name}")


def test_shared_logprobs_equal_each_view_alone(tiny_model_dir, tiny_tokenizer):
    """Independent oracle: the model's own forward of each view by itself."""
    tok = tiny_tokenizer
    samples = _batch(tok)
    s = _settings(tok, sampling=Sampling(temperature=1.0, stop_token_ids=(tok.eos_token_id,)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    with torch.no_grad():
        logp, _ = policy_logprobs(model, samples, s, tok.pad_token_id, packed=True)
        want = []
        for q in samples:
            views = [(list(c) + list(r), len(c)) for c, r in q.turns] or [(q.sequence, q.prompt_length)]
            for ids, start in views:
                logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                want += [logits[t - 1, ids[t]] for t in range(max(start, 1), len(ids))]
    torch.testing.assert_close(logp, torch.stack(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "completion_mean", "concat"])
def test_shared_features_equal_padded_and_unshared(tiny_model_dir, tiny_tokenizer, method):
    tok = tiny_tokenizer
    s = _settings(tok, embed_method=method)
    features = FeatureNetwork(_model(tiny_model_dir, "lora"), [0, 2, 4])
    batch = _batch(tok)
    seqs, prompts = [q.sequence for q in batch], [q.prompt_length for q in batch]
    out = {
        (packed, share): embed(features, seqs, prompts, s, tok.pad_token_id, 8, packed=packed, share_prefixes=share)
        for packed, share in ((False, False), (True, False), (True, True))
    }
    assert out[True, True].shape == (len(seqs), 3 * 64 * (3 if method == "concat" else 1))
    torch.testing.assert_close(out[True, True], out[False, False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True, True], out[True, False], atol=1e-5, rtol=1e-5)
    # Identical sequences 2 and 3 read the same shared positions: bitwise the same features.
    assert torch.equal(out[True, True][2], out[True, True][3])


def test_shared_prefix_with_grouped_query_attention():
    """Two kv heads for four query heads: the shared segment's keys are repeated like any other."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    seqs = [[1, 5, 9, 13, 17, 21], [1, 5, 9, 30, 31], [1, 5, 9, 13, 40], [2, 3]]
    row = packing.pack(seqs)
    # Nodes [1 5 9], [2 3], then [13], [30 31] under the first, then [17 21], [40] under [13]: 11 tokens.
    assert row.plan.total == 3 + 2 + 1 + 2 + 2 + 1
    with torch.no_grad():
        hidden = packing.unpack(packing.packed_forward(model.model, row), row.plan)  # [4, 6, 32]
        for i, q in enumerate(seqs):
            alone = model.model(input_ids=torch.tensor([q])).last_hidden_state[0]
            torch.testing.assert_close(hidden[i, : len(q)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_equals_each_view_alone(name):
    """Whichever path ``use_packed`` picks (shared-prefix row, or padded for attention the packed backend
    cannot reproduce: windows, soft-caps), each loss token's predicting state is the model's own state at
    that position of its view alone. Prefixes of 9 shared tokens exceed the configs' 4-token windows."""
    model = build_model(name)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 37, (9,), generator=gen).tolist()
    tails = [torch.randint(3, 37, (n,), generator=gen).tolist() for n in (5, 4, 6, 7)]
    seqs = [prefix + tails[0], prefix + tails[1], prefix[:4] + tails[2], tails[3]]
    views = [(q, [False] * 3 + [True] * (len(q) - 3)) for q in seqs]
    with torch.no_grad():
        states, targets, owner = predicting_states(model, views, 0)
        body = backbone_of(model)
        want = [body(input_ids=torch.tensor([q])).last_hidden_state[0, 2:-1] for q in seqs]
    assert use_packed(model) == (packing.unsupported_reason(model.config) is None)
    assert targets.tolist() == [t for q in seqs for t in q[3:]]
    assert owner.tolist() == [v for v, q in enumerate(seqs) for _ in q[3:]]
    torch.testing.assert_close(states, torch.cat(want), atol=1e-5, rtol=0)
