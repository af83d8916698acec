"""The faster decoders draw exactly what the previous ones drew, seed for seed.

Strided generation now writes its KV cache in place (``PreallocatedCache``) and lets each decoding step attend
in chunks of blocks over the keys they may see (``decode_plan``); before, the cache grew by concatenation and
every step attended over the whole cache with an [n K, cache] mask. The previous path is rebuilt here from
transformers' ``DynamicCache`` and that full mask (``layout.attention_mask()``), and both must produce the
same tokens for the same generators: sampled (temperature 1, top-p), documents of different lengths
(invalid block slots), several chunks per step, sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from ebft.attention import strided as strided_attention
from ebft.attention.kernels import attend
from ebft.attention.kv_cache import PreallocatedCache
from ebft.attention.strided import MaskedQueries
from ebft.attention.strided_layout import build_layout
from ebft.strided import generate as generate_module
from ebft.strided.generate import generate_blocks
from ebft.strided.step import document_generators


@dataclass
class FullCachePlan:
    """The previous decoding step: every query against the whole cache, through a slice of the S x S mask."""

    masked: MaskedQueries

    def attend(self, query, key, value, *, scaling, window, softcap_value, dropout):
        mask = self.masked.mask_for(window)
        return attend(query, key, value, mask, scaling=scaling, softcap_value=softcap_value, dropout=dropout)


def full_cache_plan(layout, t, positions):
    rows = layout.step_rows(t)
    mask = layout.attention_mask()
    return FullCachePlan(MaskedQueries(mask[:, :, rows, : rows.stop], positions[:, rows], positions[:, : rows.stop]))


def _model(kind: str):
    common = {
        "vocab_size": 41,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,  # peaky enough that draws depend on the logits, not only on the noise
        "attn_implementation": "sdpa",
    }
    torch.manual_seed(0)
    if kind == "mistral":  # sliding window of 5 keys on every layer
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # non-unit norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


def _batch(lengths, n, stride, g):
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for d, length in enumerate(lengths):
        ids[d, :length] = torch.randint(1, 41, (length,), generator=gen)
    layout = build_layout(
        torch.tensor(lengths),
        torch.full((len(lengths),), -1),
        ids.shape[1],
        stride=stride,
        context_length=2,
        gen_len=g,
        min_completion_prefix=0,
        n=n,
    )
    return ids, layout


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_strided_generation_draws_what_the_full_cache_path_drew(monkeypatch, kind, top_p):
    model = _model(kind)
    ids, layout = _batch([70, 43], n=3, stride=2, g=4)  # 34 blocks x 3 samples: 2 chunks per step
    assert layout.k * layout.n > strided_attention.DECODE_CHUNK_QUERIES and not bool(layout.valid.all())

    def draws(step):
        return generate_blocks(
            model, ids, layout, temperature=1.0, top_p=top_p, generators=document_generators(7, step, 0, 2, "cpu")
        )

    new = [draws(step) for step in range(3)]
    monkeypatch.setattr(generate_module, "PreallocatedCache", lambda capacity: DynamicCache())
    monkeypatch.setattr(generate_module, "decode_plan", full_cache_plan)
    old = [draws(step) for step in range(3)]
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)
    # Not a vacuous comparison: the draws differ between steps (seeds) and between samples of a block.
    assert not torch.equal(new[0], new[1])
    assert bool((new[0][:, 0] != new[0][:, 1]).any())


def test_chunked_decoding_step_equals_the_full_cache_attention():
    """One decoding step's attention output, chunked over the keys each block may see, against the whole cache
    under the full mask (random queries, keys and values; the cache holds the prefill and steps 0..t)."""
    _, layout = _batch([70, 43], n=3, stride=2, g=4)
    pos = layout.position_ids()
    D, cache = layout.num_docs, layout.step_rows(2).stop
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(D, 4, layout.per_step, 8, generator=gen)
    k = torch.randn(D, 2, cache, 8, generator=gen)
    v = torch.randn(D, 2, cache, 8, generator=gen)
    kw = {"scaling": 0.3, "softcap_value": None, "dropout": 0.0}
    for window in (None, 5):
        got = strided_attention.decode_plan(layout, 2, pos, chunk_queries=16).attend(q, k, v, window=window, **kw)
        want = full_cache_plan(layout, 2, pos).attend(q, k, v, window=window, **kw)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_preallocated_cache_holds_what_concatenation_holds():
    """Prefill, rows repeated, steps written in place, rows dropped, a step past the capacity (it grows):
    the keys and values seen after every update equal those of transformers' DynamicLayer."""
    gen = torch.Generator().manual_seed(1)
    ours, theirs = PreallocatedCache(7), DynamicCache()
    for cache in (ours, theirs):
        cache.update(*torch.randn(2, 2, 3, 5, 4, generator=torch.Generator().manual_seed(2)), layer_idx=0)
    for cache in (ours, theirs):
        cache.reorder_cache(torch.tensor([0, 0, 1, 1]))
    assert ours.get_seq_length() == theirs.get_seq_length() == 5
    for step, size in enumerate([1, 1, 3, 4]):
        kv = torch.randn(2, 4 if step < 2 else 3, 3, size, 4, generator=gen)
        if step == 2:
            for cache in (ours, theirs):
                cache.batch_select_indices(torch.tensor([0, 2, 3]))
        a, b = ours.update(kv[0], kv[1], layer_idx=0), theirs.update(kv[0], kv[1], layer_idx=0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
    assert ours.get_seq_length() == 14  # past the capacity of 7
