"""FLOP and byte counts of the benchmarked phases, and each phase's fraction of this machine's limits.

Pure Python and torch, no ebft import: the axolotl scripts (another interpreter) use it too, with the same
counts, so both programs are measured against the same minimal work.

Counts (fp32 unless ``weight_bytes`` says otherwise; 2 FLOPs per multiply-add):

* a forward of T tokens through ``depth`` decoder layers: ``2 * N_layer * depth * T`` for the weight matrices
  (N_layer: q, k, v, o, gate, up, down of one layer; norms, rotary and LoRA adapters not counted), plus
  ``4 * P * d_attn * depth`` for attention (QK^T and PV; P: the (query, key) pairs the mask allows, per
  layer; d_attn: heads x head_dim), plus ``2 * N_head * R`` for the R rows that go through the LM head
  (N_head: vocab x hidden);
* a training pass (forward + backward) of the same: ``(2 + 2w) * (N_layer * depth * T + N_head * R) +
  12 * P * d_attn * depth``, w = 1 when the weights are frozen (LoRA: input gradients only), 2 when they
  train (full fine-tune: weight gradients too); attention backward is twice its forward;
* bytes of one model call: every weight it uses, read once (``weight_bytes`` each), plus, for a cached
  decoding step, the cached keys and values it reads (``2 * kv_width * depth`` fp32 values per cached
  position: once per row in structured mode, where every row has its own cache, once per document in
  strided mode, where the n x K rows of a step share the document's cache).

A call's lower bound is ``max(matmul time, memory time)``: its matrix FLOPs at the machine's measured fp32
matmul rate for that shape and row count (``benchmarks/limits.py``; attention at the body's rate), or its
bytes at the measured streaming-read bandwidth. A phase's bound is the sum over its calls; its fraction of
the limit is bound / measured seconds (1.0 = running at this machine's limit).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A decoder's matrix sizes: what the counts and the matmul measurements need."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    # Hybrid and recurrent models (benchmarks/hybrid_step.py): the weight-matrix parameters of one layer, counted
    # from the model itself, and the share of layers that attend (the others mix by a recurrence, not counted).
    matrix_params: int | None = None
    attention_share: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """From a transformers config (Llama-style attention and gated MLP)."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            layers=cfg.num_hidden_layers,
        )

    @classmethod
    def of_model(cls, config, layers) -> ModelShape:
        """Any decoder, hybrids included: the weight-matrix parameters of its decoder ``layers`` (every 2-D weight,
        the projections of recurrent layers included, LoRA adapters not), attention on the share of layers whose
        ``layer_types`` entry is full attention (without ``layer_types``: all, or none for a model without
        attention heads, such as Mamba). The sizes that pick the measured matmul rates are read as for a Llama
        (a hybrid's recurrent mixing itself, the delta rule's or the state-space scan's own arithmetic, is not
        counted)."""
        matrices = sum(p.numel() for n, p in layers.named_parameters() if p.dim() == 2 and "lora_" not in n)
        types = list(getattr(config, "layer_types", None) or [])
        attends = getattr(config, "num_attention_heads", None) is not None  # a state-space model has none
        share = types.count("full_attention") / len(types) if types else float(attends)
        heads = getattr(config, "num_attention_heads", None) or config.num_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", None) or 2 * config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
            matrix_params=matrices // config.num_hidden_layers,
            attention_share=share,
        )

    @property
    def key(self) -> str:
        """The matrix sizes and the depth (the body's rates are measured over every layer's weights: how much of
        them the caches hold depends on the depth)."""
        sizes = f"h{self.hidden}-i{self.intermediate}-a{self.heads}x{self.head_dim}-kv{self.kv_heads}-v{self.vocab}"
        return f"{sizes}-l{self.layers}"

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def body_linears(self) -> list[tuple[int, int]]:
        """(out, in) of one layer's weight matrices: q, k, v, o, gate, up, down."""
        h, a, kv, i = self.hidden, self.attn_width, self.kv_width, self.intermediate
        return [(a, h), (kv, h), (kv, h), (h, a), (i, h), (i, h), (h, i)]

    @property
    def layer_params(self) -> int:
        if self.matrix_params is not None:
            return self.matrix_params
        return sum(o * i for o, i in self.body_linears())

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden


# The shapes of the benchmarked rows (limits.py measures these by name).
SHAPES = {
    "smollm2-135m": ModelShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, layers=30),
    "llama-5.6m": ModelShape(hidden=256, intermediate=1024, heads=4, kv_heads=4, head_dim=64, vocab=2048, layers=4),
}


@dataclass
class Call:
    """One model call's work. ``rows``: the matmul row count (tokens of the call); ``head_rows``: rows through
    the LM head; ``backward``: body and head FLOPs that run as input-gradient (or weight-gradient) products."""

    rows: int
    body_flops: float
    head_flops: float
    attn_flops: float
    bytes: float
    head_rows: int = 0
    backward_body_flops: float = 0.0
    backward_head_flops: float = 0.0

    @property
    def flops(self) -> float:
        return self.body_flops + self.head_flops + self.attn_flops + self.backward_body_flops + self.backward_head_flops


def forward_call(
    shape: ModelShape,
    tokens: int,
    pairs: float,
    *,
    head_rows: int = 0,
    depth: int | None = None,
    cached_tokens: float = 0.0,
    weight_bytes: int = 4,
) -> Call:
    """A forward of ``tokens`` through ``depth`` layers (all by default) and ``head_rows`` rows of the head.
    ``cached_tokens``: cached (key, value) positions the call reads (decoding), fp32."""
    depth = shape.layers if depth is None else depth
    weights = shape.layer_params * depth + (shape.head_params if head_rows else 0)
    kv_bytes = 4 * 2 * shape.kv_width * depth * shape.attention_share * cached_tokens
    return Call(
        rows=tokens,
        body_flops=2.0 * shape.layer_params * depth * tokens,
        head_flops=2.0 * shape.head_params * head_rows,
        attn_flops=4.0 * pairs * shape.attn_width * depth * shape.attention_share,
        bytes=weight_bytes * weights + kv_bytes,
        head_rows=head_rows,
    )


def training_call(
    shape: ModelShape, tokens: int, pairs: float, *, head_rows: int, weights_train: bool, weight_bytes: int = 4
) -> Call:
    """Forward and backward of ``tokens`` (see the module docstring: (2 + 2w) and 12 P d_attn)."""
    fwd = forward_call(shape, tokens, pairs, head_rows=head_rows, weight_bytes=weight_bytes)
    w = 2 if weights_train else 1
    return Call(
        rows=tokens,
        body_flops=fwd.body_flops,
        head_flops=fwd.head_flops,
        attn_flops=3 * fwd.attn_flops,
        bytes=2 * fwd.bytes,
        head_rows=head_rows,
        backward_body_flops=w * fwd.body_flops,
        backward_head_flops=w * fwd.head_flops,
    )


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over ``length`` tokens."""
    return length * (length + 1) // 2


def _interpolate(table: dict[int, float], rows: int) -> float:
    """Rate at ``rows`` from rates measured at some row counts: linear in log(rows), clamped at the ends."""
    points = sorted(table.items())
    if rows <= points[0][0]:
        return points[0][1]
    for (m0, r0), (m1, r1) in zip(points, points[1:], strict=False):
        if rows <= m1:
            f = (math.log(rows) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return r0 + f * (r1 - r0)
    return points[-1][1]


@dataclass
class Limits:
    """Measured limits at one thread count: bandwidth (GB/s) and matmul rates (GFLOP/s) per shape key,
    layout ("forward": x W^T, "input_grad": g W), part ("body", "head") and row count."""

    threads: int
    bandwidth_gb_s: float
    matmul: dict = field(default_factory=dict)
    source: str = "measured in this process"

    @classmethod
    def load(cls, path: str | Path, threads: int) -> Limits:
        data = json.loads(Path(path).read_text())
        entry = data["by_threads"].get(str(threads))
        if entry is None:
            raise SystemExit(f"{path} has no limits for {threads} threads (has {sorted(data['by_threads'])})")
        matmul = {
            key: {
                layout: {part: {int(m): r for m, r in rates.items()} for part, rates in parts.items()}
                for layout, parts in layouts.items()
            }
            for key, layouts in entry["matmul_gflop_s"].items()
        }
        return cls(threads, entry["bandwidth_gb_s"], matmul, source=str(path))

    def has(self, shape: ModelShape) -> bool:
        return shape.key in self.matmul

    def rate(self, shape: ModelShape, part: str, rows: int, layout: str = "forward") -> float:
        return 1e9 * _interpolate(self.matmul[shape.key][layout][part], max(rows, 1))

    def call_bound(self, shape: ModelShape, call: Call) -> tuple[float, float]:
        """(matmul seconds, memory seconds) of one call at this machine's limits."""
        body_rate = self.rate(shape, "body", call.rows)
        compute = (call.body_flops + call.attn_flops) / body_rate
        if call.head_flops:
            compute += call.head_flops / self.rate(shape, "head", call.head_rows)
        if call.backward_body_flops:
            compute += call.backward_body_flops / self.rate(shape, "body", call.rows, "input_grad")
        if call.backward_head_flops:
            compute += call.backward_head_flops / self.rate(shape, "head", call.head_rows, "input_grad")
        return compute, call.bytes / (1e9 * self.bandwidth_gb_s)


@dataclass
class PhaseReport:
    name: str
    seconds: float
    flops: float
    bytes: float
    matmul_bound: float  # seconds if every call ran at the matmul rate
    memory_bound: float  # seconds if every call ran at the bandwidth
    bound: float  # sum over calls of max(matmul, memory)

    @property
    def fraction(self) -> float:
        return self.bound / self.seconds if self.seconds > 0 else float("nan")

    @property
    def limited_by(self) -> str:
        return "memory" if self.memory_bound > self.matmul_bound else "matmul"

    def line(self) -> str:
        return (
            f"{self.name}: {self.seconds:.3f} s, {self.flops / 1e9:.1f} GFLOP ({self.flops / 1e9 / self.seconds:.1f} "
            f"GFLOP/s), {self.bytes / 1e9:.2f} GB read ({self.bytes / 1e9 / self.seconds:.1f} GB/s); bound "
            f"{self.bound:.3f} s (matmul {self.matmul_bound:.3f} s, memory {self.memory_bound:.3f} s, "
            f"{self.limited_by}-limited) -> {100 * self.fraction:.0f}% of the limit"
        )

    def as_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 4),
            "gflop": round(self.flops / 1e9, 3),
            "gb": round(self.bytes / 1e9, 4),
            "bound_seconds": round(self.bound, 4),
            "matmul_bound_seconds": round(self.matmul_bound, 4),
            "memory_bound_seconds": round(self.memory_bound, 4),
            "limited_by": self.limited_by,
            "fraction_of_limit": round(self.fraction, 4),
        }


def phase_report(name: str, seconds: float, calls: list[Call], shape: ModelShape, limits: Limits) -> PhaseReport:
    bounds = [limits.call_bound(shape, c) for c in calls]
    return PhaseReport(
        name=name,
        seconds=seconds,
        flops=sum(c.flops for c in calls),
        bytes=sum(c.bytes for c in calls),
        matmul_bound=sum(b[0] for b in bounds),
        memory_bound=sum(b[1] for b in bounds),
        bound=sum(max(b) for b in bounds),
    )


# -- strided mode (one packed row per document; docs/design.md §4) ----------------------------------------------------


def strided_pairs(doc_len: int, anchors: list[int], n: int, g: int) -> int:
    """(query, key) pairs of one document's packed row: the document causally, and generated token (i, k, t)
    sees the c_k document keys before its anchor and the t + 1 tokens of its own rollout up to itself."""
    return causal_pairs(doc_len) + n * sum(g * c + g * (g + 1) // 2 for c in anchors)


def strided_generation_calls(
    shape: ModelShape, doc_len: int, anchors: list[list[int]], n: int, g: int, *, weight_bytes: int = 4
) -> list[Call]:
    """One causal prefill of the D documents (the head on each valid block's last prefix position), then g - 1
    cached decoding steps of n x (valid blocks) rows each; step t's row (i, k) attends to the c_k document keys
    and t + 1 keys of its own rollout, and the step reads each document's cache (L + t n K keys) once."""
    D = len(anchors)
    blocks = sum(len(a) for a in anchors)
    w = {"weight_bytes": weight_bytes}
    calls = [forward_call(shape, D * doc_len, D * causal_pairs(doc_len), head_rows=blocks, **w)]
    for t in range(1, g):
        rows = n * blocks
        pairs = n * sum(c + t + 1 for a in anchors for c in a)
        cached = D * doc_len + t * rows
        calls.append(forward_call(shape, rows, pairs, head_rows=rows, cached_tokens=cached, **w))
    return calls


def strided_feature_calls(
    shape: ModelShape, doc_len: int, anchors: list[list[int]], n: int, g: int, depth: int, *, weight_bytes: int = 4
) -> list[Call]:
    """The feature network over each packed row (S = L + g n K tokens), layers 1..depth, no head."""
    tokens = sum(doc_len + g * n * len(a) for a in anchors)
    pairs = sum(strided_pairs(doc_len, a, n, g) for a in anchors)
    return [forward_call(shape, tokens, pairs, depth=depth, weight_bytes=weight_bytes)]


def strided_policy_calls(
    shape: ModelShape,
    doc_len: int,
    anchors: list[list[int]],
    n: int,
    g: int,
    *,
    ce_targets: int,
    weights_train: bool,
    weight_bytes: int = 4,
) -> list[Call]:
    """One training pass per document's packed row; the head scores every generated token and the CE targets."""
    return [
        training_call(
            shape,
            doc_len + g * n * len(a),
            strided_pairs(doc_len, a, n, g),
            head_rows=n * len(a) * g + ce_targets,
            weights_train=weights_train,
            weight_bytes=weight_bytes,
        )
        for a in anchors
    ]


# -- structured mode (prompt + completions; counted the same way for ebft and for axolotl) -------------------


def structured_generation_calls(
    shape: ModelShape, prompts: list[int], completions: list[list[int]], *, weight_bytes: int = 4
) -> list[Call]:
    """Sampling ``completions[p]`` (token counts of prompt p's samples) after prompts of ``prompts`` tokens:
    each prompt prefilled once (its last position through the head), then one decoding call per step with
    every row still generating: a completion of c tokens takes c - 1 calls after the prefill; at step t a row
    attends to (and reads from its cache) its prompt and the t tokens before the new one."""
    w = {"weight_bytes": weight_bytes}
    calls = [forward_call(shape, sum(prompts), sum(causal_pairs(lp) for lp in prompts), head_rows=len(prompts), **w)]
    for t in range(1, max(c for cs in completions for c in cs)):
        active = [lp + t for lp, cs in zip(prompts, completions, strict=True) for c in cs if c > t]
        rows = len(active)
        calls.append(forward_call(shape, rows, sum(active), head_rows=rows, cached_tokens=sum(active), **w))
    return calls


def _shared_prompt_counts(prompt: int, continuations: list[int]) -> tuple[int, int]:
    """(tokens, attention pairs) of one prompt followed by each continuation, the prompt computed once."""
    tokens = prompt + sum(continuations)
    pairs = causal_pairs(prompt) + sum(c * prompt + causal_pairs(c) for c in continuations)
    return tokens, pairs


def structured_feature_calls(
    shape: ModelShape,
    prompts: list[int],
    completions: list[list[int]],
    truths: list[int],
    depth: int,
    *,
    weight_bytes: int = 4,
) -> list[Call]:
    """The frozen network, layers 1..depth, no head, over prompt + completion and prompt + ground truth, each
    prompt computed once (the least work the reward needs)."""
    calls = []
    for lp, cs, gt in zip(prompts, completions, truths, strict=True):
        tokens, pairs = _shared_prompt_counts(lp, [*cs, gt])
        calls.append(forward_call(shape, tokens, pairs, depth=depth, weight_bytes=weight_bytes))
    return calls


def structured_policy_calls(
    shape: ModelShape,
    prompts: list[int],
    completions: list[list[int]],
    *,
    weights_train: bool,
    truths: list[int] | None = None,
    weight_bytes: int = 4,
) -> list[Call]:
    """Forward and backward over prompt + completion, each prompt computed once; the head scores every
    completion token (the first one from the prompt's last position). ``truths``: ground-truth lengths of a CE
    term (prompt + ground truth, the head on every ground-truth token), none when None."""
    calls = []
    for p, (lp, cs) in enumerate(zip(prompts, completions, strict=True)):
        ends = [*cs, truths[p]] if truths is not None else cs
        tokens, pairs = _shared_prompt_counts(lp, ends)
        calls.append(
            training_call(
                shape, tokens, pairs, head_rows=sum(ends), weights_train=weights_train, weight_bytes=weight_bytes
            )
        )
    return calls


def report_phases(label: str, record: dict, work: dict[str, list[Call]], shape: ModelShape, limits: Limits):
    """Print each phase of one step against the limits, then the step; returns the PhaseReports."""
    reports = [phase_report(name, record[name], calls, shape, limits) for name, calls in work.items()]
    for r in reports:
        print(f"{label} step, {r.line()}")
    bound = sum(r.bound for r in reports)
    seconds = record["seconds"]
    print(f"{label} step: {seconds:.2f} s against a bound of {bound:.2f} s ({100 * bound / seconds:.0f}%)")
    return reports
