"""Oracles for the packed strided layout: every generated token must behave exactly as if its block
had been run on its own, x[:c_k] + block tokens, with ordinary causal attention."""

from __future__ import annotations

import pytest
import torch

from ebft.attention.strided_layout import build_layout, flex_block_mask, flex_mask_mod
from ebft.losses import token_logprobs
from ebft.strided.generate import generate_blocks, pack

ATOL = 2e-5


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=37,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def _docs(lengths, pad=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad, dtype=torch.long)
    for d, n in enumerate(lengths):
        ids[d, :n] = torch.randint(1, 37, (n,), generator=gen)
    return ids, torch.tensor(lengths)


def _layout(lengths, doc_len, prompt=None, n=3, stride=3, ctx=2, g=3, mcp=0):
    prompt = torch.full((len(lengths),), -1) if prompt is None else torch.tensor(prompt)
    return build_layout(
        torch.tensor(lengths),
        prompt,
        doc_len,
        stride=stride,
        context_length=ctx,
        gen_len=g,
        min_completion_prefix=mcp,
        n=n,
    )


def test_anchors_per_document_and_padding_never_anchored():
    # lengths 14 and 9, context 2, stride 3, g 3: blocks need c_k + 3 <= length.
    # doc 0: anchors 2, 5, 8, 11 (11 + 3 = 14 fits); doc 1: 2, 5 (8 + 3 = 11 > 9).
    lay = _layout([14, 9], 14)
    assert lay.anchors[0].tolist() == [2, 5, 8, 11]
    assert lay.valid.tolist() == [[True] * 4, [True, True, False, False]]
    # With a prompt of 4 tokens and min_completion_prefix 1 the first anchor is max(2, 4 + 1) = 5.
    lay = _layout([14, 9], 14, prompt=[4, -1], mcp=1)
    assert lay.anchors[0, : int(lay.valid[0].sum())].tolist() == [5, 8, 11]
    assert lay.anchors[1, :2].tolist() == [2, 5]


@pytest.mark.parametrize(
    ("prompt", "mcp", "ctx", "first"),
    [
        (4, 1, 2, 5),  # prompt + prefix = 5 > context 2: the completion's first tokens stay ground truth
        (1, 1, 5, 5),  # prompt + prefix = 2 < context 5: the anchor never moves before context_length
        (3, 0, 3, 3),  # equal
        (0, 3, 1, 3),  # an empty prompt is still a prompt (-1 is none): 0 + 3 > context 1
    ],
)
def test_first_anchor_is_max_of_context_and_prompt_plus_prefix(prompt, mcp, ctx, first):
    from ebft.strided.anchors import first_anchor

    # a = max(context_length, prompt_length + min_completion_prefix); stride 2, g 2, length 12:
    # blocks at a, a + 2, ... while c_k + 2 <= 12.
    assert first_anchor(ctx, prompt, mcp) == first
    lay = _layout([12, 12], 12, prompt=[prompt, -1], stride=2, ctx=ctx, g=2, mcp=mcp)
    assert lay.anchors[0, : int(lay.valid[0].sum())].tolist() == list(range(first, 11, 2))
    # A row without a prompt starts at context_length whatever min_completion_prefix says.
    assert first_anchor(ctx, None, mcp) == ctx
    assert lay.anchors[1, : int(lay.valid[1].sum())].tolist() == list(range(ctx, 11, 2))


@pytest.mark.parametrize(
    ("length", "anchor", "stride", "g", "expected"),
    [
        (14, 2, 3, 3, 4),  # anchors 2, 5, 8, 11: 11 + 3 = 14 fits exactly
        (13, 2, 3, 3, 3),  # 11 + 3 = 14 > 13: three blocks
        (5, 2, 3, 3, 1),  # only the first window [2, 5) fits
        (4, 2, 3, 3, 0),  # 2 + 3 = 5 > 4: none
        (10, 0, 1, 1, 10),  # every position
        (9, 1, 4, 2, 2),  # anchors 1, 5 (5 + 2 <= 9); 9 + 2 > 9
        (3, 2, 1, 3, 0),  # 2 + 3 > 3; the count formula alone would give (3 - 3 - 2) // 1 + 1 = -1
    ],
)
def test_num_blocks_hand_values_agree_with_block_anchors(length, anchor, stride, g, expected):
    from ebft.strided.anchors import block_anchors, num_blocks

    # The data loader counts blocks with num_blocks, the layout with block_anchors: they must agree.
    assert num_blocks(length, anchor, stride, g) == expected
    anchors, valid = block_anchors(torch.tensor([length]), torch.tensor([anchor]), stride, g)
    assert int(valid.sum()) == expected
    assert anchors[0, :expected].tolist() == [anchor + k * stride for k in range(expected)]


def test_select_is_one_documents_layout():
    lay = _layout([14, 9], 14)  # anchors [[2, 5, 8, 11], [2, 5, 2, 2]]; valid 4 and 2 slots
    for d in range(2):
        one = lay.select(d)
        assert (one.doc_len, one.n, one.g, one.k, one.num_docs) == (14, lay.n, lay.g, lay.k, 1)
        assert one.anchors.tolist() == [lay.anchors[d].tolist()]
        assert one.valid.tolist() == [lay.valid[d].tolist()]


@pytest.mark.parametrize("window", [None, 3])
def test_mask_matches_rule_by_brute_force(window):
    lay = _layout([10, 8], 10, n=2, stride=2, ctx=3, g=2)
    mask = lay.attention_mask(window)
    L, n, K, g = lay.doc_len, lay.n, lay.k, lay.g
    meta = {}  # packed position -> (t, i, k)
    for t in range(g):
        for i in range(n):
            for k in range(K):
                meta[L + t * n * K + i * K + k] = (t, i, k)
    for d in range(2):

        def position(p, d=d):  # document token j sits at j; generated token (t, i, k) stands in for c_k + t
            return p if p < L else int(lay.anchors[d, meta[p][2]]) + meta[p][0]

        for q in range(lay.total_len):
            for kv in range(lay.total_len):
                if q < L:
                    expected = kv < L and kv <= q
                elif kv < L:
                    expected = kv < int(lay.anchors[d, meta[q][2]])
                else:
                    (tq, iq, kq), (tk, ik, kk) = meta[q], meta[kv]
                    expected = iq == ik and kq == kk and tk <= tq
                if window is not None:  # a sliding-window layer also drops keys `window` or more positions back
                    expected = expected and position(q) - position(kv) < window
                assert bool(mask[d, 0, q, kv]) == expected, (d, q, kv)
    if window is not None:
        assert not torch.equal(mask, lay.attention_mask())  # the window bites here


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_dense_mask(window):
    from torch.nn.attention.flex_attention import create_mask

    lay = _layout([12, 9], 12, n=3, stride=2, ctx=2, g=3)
    S = lay.total_len
    dense = lay.attention_mask(window)
    assert torch.equal(create_mask(flex_mask_mod(lay, window), lay.num_docs, 1, S, S, device="cpu"), dense)
    # The CUDA path's BlockMask: one per document, built on that mask_mod.
    block = flex_block_mask(lay, window)
    assert block.shape[0] == lay.num_docs
    assert torch.equal(create_mask(block.mask_mod, lay.num_docs, 1, S, S, device="cpu"), dense)


def test_packed_logits_equal_independent_block_forwards(model):
    """Oracle (a): logits of every generated token == forward of x[:c_k] + its block, causal."""
    lengths = [13, 10]
    ids, _ = _docs(lengths)
    lay = _layout(lengths, ids.shape[1], n=2, stride=3, ctx=2, g=3)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 37, (2, lay.n, lay.k, lay.g), generator=gen)
    with torch.no_grad():
        packed = model(pack(ids, tokens), attention_mask=lay.attention_mask(), position_ids=lay.position_ids()).logits
        for d, length in enumerate(lengths):
            doc_logits = model(ids[d : d + 1, :length]).logits[0]
            assert torch.allclose(packed[d, :length], doc_logits, atol=ATOL)
            for k in range(int(lay.valid[d].sum())):
                c = int(lay.anchors[d, k])
                for i in range(lay.n):
                    ref = model(torch.cat([ids[d, :c], tokens[d, i, k]])[None]).logits[0, c:]
                    rows = lay.gen_index()[i, k]
                    assert torch.allclose(packed[d, rows], ref, atol=ATOL), (d, i, k)


def _greedy_oracle(model, prefix, g):
    seq = prefix.clone()
    with torch.no_grad():
        for _ in range(g):
            seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
    return seq[len(prefix) :]


def test_cached_greedy_generation_equals_per_block_recompute(model):
    """Oracle (b): KV-cached block-parallel decoding at T=0 == greedy full recompute from x[:c_k]."""
    lengths = [15, 11]
    ids, _ = _docs(lengths, seed=3)
    lay = _layout(lengths, ids.shape[1], n=2, stride=4, ctx=3, g=4)
    tokens = generate_blocks(model, ids, lay, temperature=0.0)
    assert tokens.shape == (2, 2, lay.k, 4)
    for d in range(2):
        for k in range(int(lay.valid[d].sum())):
            c = int(lay.anchors[d, k])
            expected = _greedy_oracle(model, ids[d, :c], 4)
            for i in range(2):
                assert tokens[d, i, k].tolist() == expected.tolist(), (d, i, k)


def test_cached_generation_uses_the_current_cache_keyword(model):
    """transformers 5.24 deprecates ``past_key_values=`` (removed in 5.40): generation must not use it
    where the model takes ``cache=``, and must keep using it where that is all the model takes (5.0-5.23)."""
    import warnings

    from ebft.modeling.parts import cache_keyword

    lay = _layout([9], 9, n=2, stride=3, ctx=2, g=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        generate_blocks(model, _docs([9])[0], lay, temperature=0.0)

    class Before524(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return None

    assert cache_keyword(Before524()) == "past_key_values"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gathered_logprobs_equal_teacher_forced_blocks(model, temperature):
    """Oracle (c): log-probs gathered through predictor_index == per-block teacher forcing at T."""
    lengths = [12, 9]
    ids, _ = _docs(lengths, seed=7)
    lay = _layout(lengths, ids.shape[1], n=3, stride=2, ctx=2, g=3)
    torch.manual_seed(11)
    tokens = generate_blocks(model, ids, lay, temperature=temperature)
    D, n, K, g = tokens.shape
    S = lay.total_len
    with torch.no_grad():
        hidden = model.model(
            input_ids=pack(ids, tokens), attention_mask=lay.attention_mask(), position_ids=lay.position_ids()
        ).last_hidden_state
        rows = (lay.predictor_index() + torch.arange(D)[:, None, None, None] * S).reshape(-1)
        got = token_logprobs(
            hidden.reshape(D * S, -1)[rows],
            tokens.reshape(-1),
            model.lm_head,
            temperature=temperature,
            chunk_size=7,
        ).reshape(D, n, K, g)
        for d in range(D):
            for k in range(int(lay.valid[d].sum())):
                c = int(lay.anchors[d, k])
                for i in range(n):
                    seq = torch.cat([ids[d, :c], tokens[d, i, k]])
                    logits = model(seq[None]).logits[0, c - 1 : c - 1 + g] / temperature
                    ref = logits.log_softmax(-1).gather(-1, tokens[d, i, k][:, None]).squeeze(-1)
                    assert torch.allclose(got[d, i, k], ref, atol=ATOL), (d, i, k)


def test_padding_does_not_change_packed_logits(model):
    lengths = [11]
    ids, _ = _docs(lengths, seed=2)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    tokens = torch.randint(1, 37, (1, 2, 3, 2), generator=torch.Generator().manual_seed(4))
    outs = []
    for x in (ids, padded):
        lay = _layout(lengths, x.shape[1], n=2, stride=3, ctx=2, g=2)
        assert lay.k == 3
        with torch.no_grad():
            logits = model(pack(x, tokens), attention_mask=lay.attention_mask(), position_ids=lay.position_ids()).logits
        outs.append(logits[0, lay.gen_index().reshape(-1)])
    assert torch.allclose(outs[0], outs[1], atol=ATOL)


def test_chunked_logprobs_gradient_matches_plain(model):
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 37, (9,))
    plain = (model.lm_head(hidden) / 0.5).log_softmax(-1).gather(-1, targets[:, None]).sum()
    (g_plain,) = torch.autograd.grad(plain, hidden)
    chunked = token_logprobs(hidden, targets, model.lm_head, temperature=0.5, chunk_size=4).sum()
    (g_chunk,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(chunked, plain, atol=1e-5)
    assert torch.allclose(g_chunk, g_plain, atol=1e-5)


def test_logprobs_of_no_rows_still_reach_the_head():
    # A process with no loss token still runs the head, so under FSDP its parameters get a (zero) gradient
    # like on every other process.
    head = torch.nn.Linear(4, 5, bias=False)
    hidden, targets = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long)
    logp, entropy = token_logprobs(hidden, targets, head, with_entropy=True)
    assert logp.shape == entropy.shape == (0,) and logp.dtype == entropy.dtype == torch.float32
    logp.sum().backward()
    assert head.weight.grad is not None and not head.weight.grad.any()
    alone = token_logprobs(hidden, targets, head)
    assert isinstance(alone, torch.Tensor) and alone.shape == (0,)


def test_top_p_logprobs_renormalise_over_the_nucleus(model):
    # Logits [2, 1, 0, -inf...]: probabilities ~ [0.665, 0.245, 0.090]; top_p 0.8 keeps the first two
    # (mass before token 1 is 0.665 < 0.8, before token 2 is 0.910 >= 0.8). Renormalised over {0, 1}:
    # log p(0) = 2 - log(e^2 + e^1) = -0.3133.
    head = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    hidden = torch.tensor([[2.0, 1.0, 0.0]])
    got = token_logprobs(hidden, torch.tensor([0]), head, top_p=0.8)
    assert got.item() == pytest.approx(2 - torch.log(torch.tensor(torch.e**2 + torch.e)).item(), abs=1e-5)


@pytest.mark.parametrize("chunk_queries", [1, 7, 256])
def test_sparse_plan_attention_equals_dense_mask(model, chunk_queries):
    """The chunked ebft_strided attention gives the dense strided mask's hidden states and gradients."""
    from ebft.attention.strided import build_plan, strided_backend, strided_forward

    lengths = [14, 9]
    ids, _ = _docs(lengths, seed=9)
    lay = _layout(lengths, ids.shape[1], prompt=[-1, 3], n=2, stride=2, ctx=2, g=3, mcp=1)
    tokens = torch.randint(1, 37, (2, lay.n, lay.k, lay.g), generator=torch.Generator().manual_seed(8))
    packed, pos = pack(ids, tokens), lay.position_ids()

    def run(sparse: bool):
        model.zero_grad()
        if sparse:
            with strided_backend(model):
                h = strided_forward(model.model, packed, pos, build_plan(lay, chunk_queries=chunk_queries))
        else:
            h = model.model(input_ids=packed, attention_mask=lay.attention_mask(), position_ids=pos).last_hidden_state
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        return h.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    h_dense, g_dense = run(False)
    h_sparse, g_sparse = run(True)
    assert model.config._attn_implementation == "sdpa"  # the backend is restored afterwards
    assert torch.allclose(h_sparse, h_dense, atol=ATOL)
    assert torch.allclose(g_sparse, g_dense, atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_plan_forward_equals_dense_mask(model):
    """The CUDA path's BlockMask (run here uncompiled, forward only) computes the same hidden states."""
    from ebft.attention.strided import build_plan, strided_backend, strided_forward

    lengths = [14, 9]
    ids, _ = _docs(lengths, seed=9)
    lay = _layout(lengths, ids.shape[1], n=2, stride=2, ctx=2, g=3)
    tokens = torch.randint(1, 37, (2, lay.n, lay.k, lay.g), generator=torch.Generator().manual_seed(3))
    packed, pos = pack(ids, tokens), lay.position_ids()
    with torch.no_grad():
        dense = model.model(input_ids=packed, attention_mask=lay.attention_mask(), position_ids=pos).last_hidden_state
        with strided_backend(model):
            flex = strided_forward(model.model, packed, pos, build_plan(lay, use_flex=True))
    assert torch.allclose(flex, dense, atol=ATOL)
