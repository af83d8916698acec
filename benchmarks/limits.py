"""This machine's limits for the benchmarks: fp32 matmul rate at the models' shapes, and streaming-read bandwidth.

    python benchmarks/limits.py --threads 1,2 --out limits.json     # about a minute on a quiet 2-core machine

What is measured, at each thread count (``torch.set_num_threads``), best of several repeats (the best is the
one least disturbed by anything else running):

* **matmul rate** (GFLOP/s, 2 FLOPs per multiply-add) of the fp32 products the models run, at row counts
  (tokens per call) from 1 (one decoding row) to 1024 (a packed training row): "forward" is ``x W^T``
  (``F.linear``: x [M, in], W [out, in]), "input_grad" is ``g W`` (g [M, out]: the backward's input gradient,
  and ebft's frozen-head log-prob gradient ``p W``). "body" is the seven matrices (q, k, v, o, gate, up, down)
  of every decoder layer, ``layers`` distinct copies timed one after another as a model pass runs them, FLOPs /
  total seconds: each matrix is used once per pass, so the caches hold what they hold in the model (SmolLM2's
  425 MB of body weights stream from memory at every call; the 5.6M model's 17 MB mostly stay in cache). One
  layer's matrices timed in a loop would stay in cache and overstate the rate of a streamed call by up to 2x at
  a few rows; "head" is the LM head (vocab x hidden), used once per call as in the model.
  Shapes: SmolLM2-135M (hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64, vocab 49,152) and the
  5.6M paper-settings Llama (hidden 256, intermediate 1024, 4 heads of 64, vocab 2,048), ``--shape`` adds others;
* **bandwidth** (GB/s): a streaming read, ``x.sum()`` over a --bandwidth-mib fp32 tensor (far larger than the
  caches), bytes / seconds.

The JSON (--out) is what the benchmark scripts read with ``--limits FILE`` to print each phase's fraction of
these limits (``benchmarks/roofline.py`` holds the FLOP and byte formulas); without it they measure the
shape they run quickly at start (``limits_for``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from roofline import SHAPES, Limits, ModelShape

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_ROWS = (1, 8, 64, 512)


def _best_seconds(fn, *, min_reps: int = 3, budget: float = 0.3) -> float:
    """Fastest of at least ``min_reps`` timed calls (more while ``budget`` seconds last, at most 50)."""
    fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _products(layout: str, rows: int, weights: list[torch.Tensor]):
    """A timed closure running one product per weight, in order, and its FLOPs: forward x W^T (x [rows, in]) or
    input-gradient g W (g [rows, out]); one input per distinct width, made once."""
    width = 1 if layout == "forward" else 0
    product = F.linear if layout == "forward" else torch.mm
    inputs = {w.shape[width]: torch.randn(rows, w.shape[width]) for w in weights}
    pairs = [(inputs[w.shape[width]], w) for w in weights]

    def run():
        for x, w in pairs:
            product(x, w)

    return run, sum(2.0 * rows * w.numel() for w in weights)


def matmul_rates(shape: ModelShape, rows=ROWS, *, reps: int = 3) -> dict:
    """GFLOP/s by layout ("forward", "input_grad"), part ("body", "head") and row count."""
    body = [torch.randn(o, i) for _ in range(shape.layers) for o, i in shape.body_linears()]
    head = [torch.randn(shape.vocab, shape.hidden)]
    out: dict = {}
    for layout in ("forward", "input_grad"):
        out[layout] = {"body": {}, "head": {}}
        for m in rows:
            for part, weights in (("body", body), ("head", head)):
                fn, flops = _products(layout, m, weights)
                out[layout][part][m] = flops / _best_seconds(fn, min_reps=reps) / 1e9
    return out


def bandwidth_gb_s(size_mib: int = 512, reps: int = 5) -> float:
    """Streaming read: bytes of a large fp32 tensor / fastest ``sum()`` over it."""
    x = torch.empty(size_mib * 2**20 // 4).uniform_()
    seconds = _best_seconds(x.sum, min_reps=reps, budget=0.0)
    return x.numel() * 4 / seconds / 1e9


def measure(threads: int, shapes: dict[str, ModelShape], rows=ROWS, *, bandwidth_mib: int = 512) -> dict:
    """The JSON entry of one thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        entry = {"bandwidth_gb_s": bandwidth_gb_s(bandwidth_mib), "matmul_gflop_s": {}, "shape_names": {}}
        for name, shape in shapes.items():
            entry["matmul_gflop_s"][shape.key] = matmul_rates(shape, rows)
            entry["shape_names"][shape.key] = name
    finally:
        torch.set_num_threads(previous)
    return entry


def limits_for(shape: ModelShape, threads: int, path: str | None = None) -> Limits:
    """The limits at ``threads`` for ``shape``: from ``path`` (limits.py's JSON) when given and it has the
    shape, else measured now (QUICK_ROWS, 256 MiB read: a few seconds)."""
    if path:
        limits = Limits.load(path, threads)
        if limits.has(shape):
            return limits
        print(f"{path} has no matmul rates for {shape.key}: measuring them now")
    entry = measure(threads, {"this model": shape}, QUICK_ROWS, bandwidth_mib=256)
    limits = Limits(threads, entry["bandwidth_gb_s"], source="measured in this process (limits.py's QUICK_ROWS)")
    limits.matmul = entry["matmul_gflop_s"]
    return limits


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        lines = cpuinfo.splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except (OSError, StopIteration):
        pass
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def table(data: dict) -> str:
    lines = []
    for threads, entry in data["by_threads"].items():
        lines.append(f"threads {threads}: streaming read {entry['bandwidth_gb_s']:.1f} GB/s")
        for key, layouts in entry["matmul_gflop_s"].items():
            name = entry["shape_names"].get(key, key)
            for layout, parts in layouts.items():
                for part, rates in parts.items():
                    cells = "  ".join(f"{m}:{r:.0f}" for m, r in rates.items())
                    lines.append(f"  {name:<13} {layout:<10} {part:<4} GFLOP/s by rows  {cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--out", default="limits.json")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts (tokens per call)")
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument(
        "--shape", action="append", default=[], help="extra shape: hidden,intermediate,heads,kv,head_dim,vocab"
    )
    args = p.parse_args(argv)
    shapes = dict(SHAPES)
    for spec in args.shape:
        h, i, a, kv, hd, v = (int(x) for x in spec.split(","))
        shapes[spec] = ModelShape(h, i, a, kv, hd, v, 1)
    rows = tuple(int(m) for m in args.rows.split(","))
    data = {"machine": machine(), "load_before": os.getloadavg(), "rows": list(rows), "by_threads": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        print(f"measuring at {threads} thread(s), load average {os.getloadavg()}", flush=True)
        data["by_threads"][str(threads)] = measure(threads, shapes, rows, bandwidth_mib=args.bandwidth_mib)
    data["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(table(data))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
