"""Block-parallel strided rollouts with a KV cache (docs/design.md §4.4).

One causal prefill of the documents gives, at positions c_k - 1, the logits of every block's first
token; then g - 1 decoding steps each feed the n*K tokens of the previous step against the cache
under the strided mask. Only the rows that are sampled go through the LM head. Cost per document is
about L + (g - 1) * n * K token-forwards instead of n * (g * L + ...) for the reference's full
recompute (docs/design.md §4.4).

Prefill and decoding run through the ``ebft_strided`` attention (``DocumentPlan``, ``DecodePlan``), so
each layer applies its own sliding window on position ids, its scaling and soft-capping, exactly as in
the training and feature passes. The cache keeps every key of every layer: a block's prefix ends at
its own anchor, not at the newest cached token, so a sliding-window layer's cache cannot be trimmed.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ebft.attention.kv_cache import PreallocatedCache
from ebft.attention.strided import DocumentPlan, decode_plan, strided_backend
from ebft.attention.strided_layout import StridedLayout
from ebft.modeling.parts import backbone_of, cache_keyword, output_head
from ebft.modeling.precision import autocast
from ebft.sampling import sample_tokens


@torch.no_grad()
def generate_blocks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layout: StridedLayout,
    *,
    temperature: float,
    top_p: float = 1.0,
    position_ids: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample every block of every sample: input_ids [D, L] -> tokens [D, n, K, g].

    ``position_ids`` [D, S] may be passed in when the caller already built them for the later passes.

    With ``generators`` (one per document), document d's draws come only from its own generator and
    its own valid blocks, so its rollouts do not depend on what else is in the batch, on padding, or on
    how an optimizer step is split into micro-batches. Invalid slots then hold token 0.
    """
    D, L = input_ids.shape
    n, K, g = layout.n, layout.k, layout.g
    pos = layout.position_ids() if position_ids is None else position_ids
    body, head = backbone_of(model), output_head(model)
    cache_kw = cache_keyword(body)
    was_training = model.training
    model.eval()
    try:
        with ExitStack() as stack:
            stack.enter_context(strided_backend(model))
            stack.enter_context(autocast(input_ids.device, autocast_dtype))
            # No config: every layer keeps all its keys (see the module docstring), in buffers sized for the
            # prefill and g - 1 decoding steps, written in place.
            cache = PreallocatedCache(L + (g - 1) * n * K)
            out = body(
                input_ids=input_ids,
                position_ids=pos[:, :L],
                use_cache=True,
                ebft_plan=DocumentPlan(L),
                **{cache_kw: cache},
            )
            # Step 0: the teacher-forced logits at c_k - 1, shared by the n samples of a block.
            last_prefix = out.last_hidden_state.gather(
                1, (layout.anchors - 1)[:, :, None].expand(-1, -1, out.last_hidden_state.shape[-1])
            )
            logits = head(last_prefix)  # [D, K, V]
            draw = _sampler(layout, temperature, top_p, generators)
            steps = [draw(logits[:, None].expand(-1, n, -1, -1))]  # [D, n, K]
            for t in range(1, g):
                rows = layout.step_rows(t - 1)
                out = body(
                    input_ids=steps[-1].reshape(D, n * K),
                    position_ids=pos[:, rows],
                    use_cache=True,
                    ebft_plan=decode_plan(layout, t - 1, pos),
                    **{cache_kw: cache},
                )
                logits = head(out.last_hidden_state).reshape(D, n, K, -1)
                steps.append(draw(logits))
    finally:
        model.train(was_training)
    return torch.stack(steps, dim=-1)


def _sampler(layout: StridedLayout, temperature: float, top_p: float, generators):
    """logits [D, n, K, V] -> tokens [D, n, K], batched or per document (see ``generate_blocks``)."""
    if generators is None:
        return lambda logits: sample_tokens(logits, temperature, top_p)
    if len(generators) != layout.num_docs:
        raise ValueError(f"need one generator per document: got {len(generators)} for {layout.num_docs}")
    counts = layout.valid.sum(dim=1).tolist()

    def draw(logits: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        for d, (count, gen) in enumerate(zip(counts, generators, strict=False)):
            out[d, :, :count] = sample_tokens(logits[d, :, :count], temperature, top_p, generator=gen)
        return out

    return draw


def pack(input_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[D, L] documents and [D, n, K, g] rollouts -> [D, S] packed rows (step-major generated region)."""
    D = input_ids.shape[0]
    return torch.cat([input_ids, tokens.permute(0, 3, 1, 2).reshape(D, -1)], dim=1)
