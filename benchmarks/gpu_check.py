"""Verify and measure every CUDA path of ebft in one run (about 8 minutes on one H200; --quick: 3).

    python benchmarks/gpu_check.py                  # on a CUDA machine: all parts
    python benchmarks/gpu_check.py --quick          # a ~3-minute subset
    python benchmarks/gpu_check.py --dry-run        # CPU: the same code on tiny shapes (the suite runs this)

Parts, in order (each with its own time cap; a global deadline stops the run before --deadline seconds):

* checks: the strided packed row against independent per-block forwards (logits, log-probs, feature
  vectors) in fp32 and bf16 autocast, through the chunked SDPA plan, the flex BlockMask eagerly and, on
  CUDA, compiled; KV-cached greedy decoding against full recomputation; one training micro-batch's loss,
  log-probs and gradients against the dense-mask path (gpu_check_checks.py);
* strided: optimizer steps at the paper's settings (stride = context = generate_max_len = 8, n = 4,
  sequence_len 1024) on Llama-3.2-1B and -3B shapes (random weights), LoRA and full fine-tune, bf16;
  and one full fine-tune with the weights stored and trained in bf16 (``torch_dtype: bfloat16``);
* structured: optimizer steps with the shared-prefill decoder's rollouts (2 prompts x 4 completions of 256 tokens);
* hybrid: the same on a Qwen3.5-shaped hybrid (Gated DeltaNet 3 : 1 full attention, ``qwen3_5_text``, built from
  a config), which structured mode runs padded, sampling with the decoder's recurrent-state cache;
* fsdp: 2 sharded processes vs 1 process (gpu_check_fsdp.py), when 2 GPUs are visible.

Timed runs report seconds per optimizer step, tokens per second, peak CUDA memory, the policy pass's model
FLOPs utilisation (the FLOP count is in the JSON as flop_formula), and each phase's fraction of the GPU's
limits: the NVIDIA datasheet's dense bf16 tensor-core peak and HBM bandwidth for the device found (the table
is in gpu_check_limits.py; --peak-tflops / --peak-tb-s override it), against the FLOPs and bytes that
benchmarks/roofline.py counts for the phase.
Writes one JSON file (--out) after every part, prints a table, and exits 1 when an equality check
fails or a part errors or times out.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

PARTS = ("checks", "strided", "structured", "hybrid", "fsdp")

# What each mode runs. The 1B shape carries the checks (its head_dim and GQA are what training uses).
SCALES = {
    "full": {
        "check_shape": "llama-3.2-1b",
        "check_lengths": (256, 200),
        "precisions": ("fp32", "bf16"),
        "strided": [("llama-3.2-1b", "lora"), ("llama-3.2-1b", None), ("llama-3.2-3b", "lora"), ("llama-3.2-3b", None)],
        "bf16_weights": ("llama-3.2-1b", None),
        "seq_len": 1024,
        "micro": 4,
        "gas": 2,
        "steps": 3,
        "structured": {"shape": "llama-3.2-1b", "prompts": 2, "prompt_tokens": 256, "completion_tokens": 256},
        "hybrid": {"shape": "qwen3.5-small", "prompts": 2, "prompt_tokens": 256, "completion_tokens": 128},
        "caps": {"checks": 150, "strided": 90, "structured": 60, "hybrid": 60, "fsdp": 150},
        "deadline": 540,
    },
    "quick": {
        "check_shape": "llama-3.2-1b",
        "check_lengths": (256, 200),
        "precisions": ("bf16",),
        "strided": [("llama-3.2-1b", "lora")],
        "bf16_weights": ("llama-3.2-1b", None),
        "seq_len": 1024,
        "micro": 4,
        "gas": 1,
        "steps": 2,
        "structured": {"shape": "llama-3.2-1b", "prompts": 2, "prompt_tokens": 256, "completion_tokens": 256},
        "hybrid": {"shape": "qwen3.5-small", "prompts": 2, "prompt_tokens": 128, "completion_tokens": 64},
        "caps": {"checks": 70, "strided": 45, "structured": 30, "hybrid": 40, "fsdp": 60},
        "deadline": 240,
    },
    "dry-run": {
        "check_shape": "tiny-a",
        "check_lengths": (40, 29),
        "precisions": ("fp32", "bf16"),
        "strided": [("tiny-a", "lora"), ("tiny-a", None), ("tiny-b", "lora"), ("tiny-b", None)],
        "bf16_weights": ("tiny-a", None),
        "seq_len": 64,
        "micro": 2,
        "gas": 1,
        "steps": 1,
        "structured": {"shape": "tiny-b", "prompts": 2, "prompt_tokens": 16, "completion_tokens": 16},
        "hybrid": {"shape": "qwen3.5-tiny", "prompts": 2, "prompt_tokens": 16, "completion_tokens": 12},
        "caps": {"checks": 120, "strided": 60, "structured": 60, "hybrid": 60, "fsdp": 240},
        "deadline": 600,
    },
}
RESERVE = 10.0  # seconds kept back from the deadline for the report
MIN_PART = 15.0  # a part that would get less than this is skipped


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~3-minute subset: bf16 checks, 1B runs, structured, hybrid")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, runs anywhere (CPU): tests the script")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: gpu_check.json)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the datasheet's)")
    p.add_argument("--peak-tb-s", type=float, default=None, help="HBM bandwidth in TB/s (default: the datasheet's)")
    p.add_argument("--deadline", type=float, default=None, help="global limit in seconds (default: per mode)")
    p.add_argument("--fsdp-cpu", action="store_true", help="run the fsdp part on CPU with gloo (for tests)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="timed runs without recomputation")
    # Self-test of the failure path: adds 1 to every gradient of the training step before it is compared.
    p.add_argument("--selftest-mismatch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def environment(device) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cuda_devices": torch.cuda.device_count(),
    }
    if device.type == "cuda":
        env |= {
            "gpu": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    try:
        here = Path(__file__).resolve().parent
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def _alarm(signum, frame):
    raise TimeoutError("the part's time cap was reached")


def run_part(report: dict, name: str, cap: float, fn, deadline_at: float, device) -> None:
    """Run ``fn(part_deadline, found)`` under its cap (SIGALRM) and the global deadline; record the outcome
    and the checks the part appended to ``found``, also those made before a timeout or an error."""
    import torch

    entry = {"name": name, "cap_seconds": cap}
    left = deadline_at - time.monotonic() - RESERVE
    if left < MIN_PART:
        report["parts"].append(entry | {"status": "skipped", "reason": "global deadline"})
        return
    budget = min(cap, left)
    started = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    found = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        entry |= {"status": "ok", "result": fn(started + budget, found)}
    except TimeoutError as exc:
        entry |= {"status": "timeout", "error": str(exc)}
    except Exception as exc:  # a failing CUDA path is a result to report; the other parts still run
        entry |= {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    report["checks"] += [{"part": name, **asdict(c)} for c in found]
    entry["seconds"] = round(time.monotonic() - started, 1)
    report["parts"].append(entry)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plan(args, scale: dict, device, workdir: Path, peak: dict) -> list[tuple[str, float, object]]:
    """(part name, cap, fn(part_deadline, found) -> result) in run order; a str instead of fn: why skipped."""
    import torch
    from gpu_check_checks import cached_decoding_check, check_documents, gradient_checks, packed_row_checks
    from gpu_check_fsdp import fsdp_part
    from gpu_check_runs import SHAPES, build_policy, strided_run, structured_run, train_config

    wanted, caps = set(args.parts.split(",")), scale["caps"]
    gc_on = not args.no_gradient_checkpointing
    warmup = 1

    def checks(_deadline, found):
        from ebft.strided.step import StridedSettings

        shape = scale["check_shape"]
        cfg = train_config("strided", adapter=None, seq_len=max(scale["check_lengths"]), micro=2, gas=1, gc=False)
        model = build_policy(shape, cfg, device)  # fp32 weights; bf16 comes from autocast
        settings = StridedSettings.from_config(cfg.ebft)
        batch = check_documents(SHAPES[shape].vocab, list(scale["check_lengths"]), device)
        paths = {"sparse-sdpa": {}, "flex-eager": {"use_flex": True, "compile_flex": False}}
        if device.type == "cuda":
            paths["flex-compiled"] = {"use_flex": True}
        step_path = ("flex-compiled" if device.type == "cuda" else "sparse-sdpa") + " training step"
        found.append(cached_decoding_check(model, batch, settings))
        for precision in scale["precisions"]:
            found += packed_row_checks(model, batch, settings, precision, paths)
            perturb = 1.0 if args.selftest_mismatch else 0.0
            found += gradient_checks(model, batch, settings, precision, step_path, perturb)
        return {"shape": shape, "document_lengths": list(scale["check_lengths"]), "paths": list(paths)}

    def with_mfu(result: dict) -> dict:
        return result | {"mfu": float(f"{result['policy_tflops'] / peak['bf16_dense_tflops']:.4g}")}

    def strided(shape, adapter, torch_dtype=None):
        def fn(deadline, _found):
            kw = {"seq_len": scale["seq_len"], "micro": scale["micro"], "gas": scale["gas"], "gc": gc_on}
            kw |= {"peak": peak, "torch_dtype": torch_dtype}
            result = strided_run(shape, adapter, device, warmup=warmup, steps=scale["steps"], deadline=deadline, **kw)
            return with_mfu(result)

        return fn

    def structured_part(part: str):
        def fn(deadline, _found):
            st = scale[part]
            result = structured_run(
                st["shape"],
                "lora",
                device,
                prompts=st["prompts"],
                generations=4,
                prompt_tokens=st["prompt_tokens"],
                completion_tokens=st["completion_tokens"],
                micro=4,
                gc=gc_on,
                warmup=warmup,
                steps=max(scale["steps"] - 1, 1),
                deadline=deadline,
                peak=peak,
            )
            return with_mfu(result)

        return fn

    def fsdp(deadline, found):
        result, checks = fsdp_part(workdir / "fsdp", cpu=args.fsdp_cpu, deadline=deadline)
        found += checks
        return result

    parts = []
    if "checks" in wanted:
        parts.append(("checks", caps["checks"], checks))
    runs = [
        (f"strided {shape} {adapter or 'full'}", caps["strided"], strided(shape, adapter))
        for shape, adapter in scale["strided"]
    ]
    if "strided" in wanted:
        parts.append(runs[0])
    if "structured" in wanted:
        parts.append(
            (f"structured {scale['structured']['shape']} lora", caps["structured"], structured_part("structured"))
        )
    if "hybrid" in wanted:
        parts.append((f"hybrid {scale['hybrid']['shape']} lora", caps["hybrid"], structured_part("hybrid")))
    if "strided" in wanted:
        shape, adapter = scale["bf16_weights"]
        name = f"strided {shape} {adapter or 'full'} bf16-weights"
        parts.append((name, caps["strided"], strided(shape, adapter, "bfloat16")))
        parts += runs[1:]
    if "fsdp" in wanted:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus >= 2 or args.fsdp_cpu:
            parts.append(("fsdp2 2 processes", caps["fsdp"], fsdp))
        else:
            why = f"{gpus} CUDA device(s) visible; FSDP2 over NCCL needs 2" if device.type == "cuda" else "no CUDA"
            parts.append(("fsdp2 2 processes", 0.0, why))
    return parts


def table(report: dict) -> str:
    lines = [f"{'part':<34} {'status':<8} {'seconds':>8}  note"]
    for p in report["parts"]:
        note = p.get("reason") or (p.get("error") or "").splitlines()[0][:70] if p["status"] != "ok" else ""
        lines.append(f"{p['name']:<34} {p['status']:<8} {p.get('seconds', 0):>8}  {note}")
    lines.append("")
    lines.append(f"{'check':<40} {'precision':<9} {'error':>10} {'tolerance':>10}  ok")
    for c in report["checks"]:
        name = f"{c['path']}: {c['quantity']}"
        lines.append(f"{name:<40} {c['precision']:<9} {c['error']:>10.3g} {c['tolerance']:>10.3g}  {c['passed']}")
    lines.append("")
    head = f"{'run':<42} {'s/step':>8} {'tokens/s':>10} {'peak MiB':>9} {'policy TFLOP/s':>15} {'MFU':>7}"
    head += f" {'rollout+feat. at limit':>23} {'policy at limit':>16}"
    lines.append(head)
    for p in report["parts"]:
        r = p.get("result") or {}
        if p["status"] == "ok" and "fastest_step_seconds" in r:
            at = r.get("at_limits", {})
            cells = [
                f"{at[k]['fraction_of_limit']:.1%} ({at[k]['limited_by']})" if k in at else "-"
                for k in ("rollout_and_features", "policy")
            ]
            lines.append(
                f"{p['name']:<42} {r['fastest_step_seconds']:>8.3f} {r['tokens_per_second']:>10.0f} "
                f"{r['peak_memory_mib']:>9} {r['policy_tflops']:>15.2f} {r['mfu']:>7.1%} {cells[0]:>23} {cells[1]:>16}"
                + ("  (warm-up step only: includes compilation)" if r["timed_steps"] == 0 else "")
            )
    peak = report.get("peaks", {})
    if peak:
        lines.append(
            f"limits: {peak['product']}, dense bf16 {peak['bf16_dense_tflops']} TFLOP/s, HBM {peak['hbm_tb_s']} TB/s "
            f"({peak['source']})"
        )
    return "\n".join(lines)


def exit_status(report: dict) -> int:
    """1 when any equality check failed or any part errored or timed out, else 0."""
    bad_parts = [p for p in report["parts"] if p["status"] in ("error", "timeout")]
    return 1 if bad_parts or not all(c["passed"] for c in report["checks"]) else 0


def main(argv=None) -> int:
    args = parse(argv)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    scale = SCALES[mode]
    deadline = args.deadline or scale["deadline"]
    t0 = time.monotonic()
    # Last resort when the main thread is stuck in native code (a hung kernel or collective) and the
    # per-part alarm cannot fire: dump every thread's stack and exit 1. The JSON so far is already written.
    faulthandler.dump_traceback_later(deadline + 20, exit=True)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: run with --dry-run (tiny shapes) or on a GPU machine", file=sys.stderr)
        return 2
    if device.type == "cuda":
        import torch._dynamo

        # One process here compiles flex_attention for two precisions, two head sizes, with and without
        # grad, at several lengths: more variants than dynamo's default limit of 8, past which it would
        # silently fall back to eager flex (O(S^2) memory). A training run needs two or three.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    from gpu_check_checks import TOLERANCE
    from gpu_check_limits import peaks
    from gpu_check_runs import FLOP_FORMULA

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peaks(name, args.peak_tflops, args.peak_tb_s)

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "environment": environment(device),
        "peak_tflops": peak["bf16_dense_tflops"],
        "peaks": peak,
        "flop_formula": FLOP_FORMULA,
        "tolerances": TOLERANCE,
        "deadline_seconds": deadline,
        "parts": [],
        "checks": [],
    }
    out = Path(args.out)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            for name, cap, fn in plan(args, scale, device, Path(work), peak):
                if isinstance(fn, str):
                    report["parts"].append({"name": name, "status": "skipped", "reason": fn})
                else:
                    run_part(report, name, cap, fn, t0 + deadline, device)
                report["total_seconds"] = round(time.monotonic() - t0, 1)
                report["passed"] = exit_status(report) == 0
                out.write_text(json.dumps(report, indent=2))
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(table(report))
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['total_seconds']} s; report: {out}")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
