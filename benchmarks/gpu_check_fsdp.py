"""The FSDP2 part of ``gpu_check.py``: ``ebft train`` sharded over 2 processes must train exactly like one
unsharded process given the same documents per step (2 x micro-batch 1 == 1 x micro-batch 2).

On CUDA the 2 processes start with ``accelerate launch --multi_gpu --num_processes 2`` (NCCL); with
``cpu=True`` with ``torch.distributed.run`` (gloo), which is how the suite exercises this part. The runs
are fp32, so the only differences left are the order of the gradient sums.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from gpu_check_checks import Check

KEYS = ("loss", "ebft/alignment", "ebft/diversity", "ebft/ce_loss", "grad_norm")
TOLERANCE = 1e-4  # relative, per logged metric and step


def _texts(limit: int = 24) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:limit]]


def prepare(work: Path) -> Path:
    """A small model folder (tokenizer + random Llama), a raw-text dataset and the run's config; returns it."""
    import yaml

    from ebft.config import load_config
    from ebft.quickstart.scratch import build_model_dir

    texts = _texts()
    model = build_model_dir(work / "model", texts, vocab_size=512, seed=0, hidden_size=128, num_layers=4)
    data = work / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in texts[:12]))
    cfg = {
        "base_model": str(model),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 128,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "bf16": False,
        "seed": 3,
        "logging_steps": 1,
        "fsdp_version": 2,
        "fsdp_config": {"reshard_after_forward": True},
    }
    cfg["ebft"] |= {"n_samples_per_prompt": 4, "temperature": 1.0, "ce_coef": 0.03}
    path = work / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    load_config(path)  # the config must validate before any process starts
    return path


def commands(cfg: Path, work: Path, *, cpu: bool, port: int) -> dict[str, list[str]]:
    """The sharded 2-process run and the unsharded 1-process reference, as argument lists."""
    train = ["-m", "ebft", "train", str(cfg)]
    if cpu:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launch += ["--main_process_port", str(port)]
    return {
        "two": [*launch, *train, "--micro_batch_size=1", f"--output_dir={work / 'two'}"],
        "one": [sys.executable, *train, "--micro_batch_size=2", f"--output_dir={work / 'one'}"],
    }


def _run(command: list[str], deadline: float, env: dict) -> str:
    """Run ``command`` in its own process group; kill the whole group when it outlives ``deadline``."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    try:
        out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{' '.join(command[:6])} ... did not finish before the part's time cap") from None
    finally:
        if proc.poll() is None:  # a timeout, or the part's alarm interrupted communicate()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {' '.join(command)}\n{out[-3000:]}")
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def fsdp_part(work: Path, *, cpu: bool, deadline: float, port: int = 29641) -> tuple[dict, list[Check]]:
    """Run both and compare their logged metrics step by step."""
    cfg = prepare(work)
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmds = commands(cfg, work, cpu=cpu, port=port)
    times = {}
    for name in ("two", "one"):
        started = time.monotonic()
        log = _run(cmds[name], deadline, env)
        times[name] = round(time.monotonic() - started, 1)
        if name == "two" and "FSDP2: policy sharded over 2 processes" not in log:
            raise RuntimeError("the 2-process run did not shard the policy:\n" + log[-3000:])
    two, one = _metrics(work / "two"), _metrics(work / "one")
    if [m["step"] for m in two] != [m["step"] for m in one]:
        raise RuntimeError(f"logged steps differ: {[m['step'] for m in two]} vs {[m['step'] for m in one]}")
    checks = []
    for key in KEYS:
        got = [m[key] for m in two]
        want = [m[key] for m in one]
        err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want, strict=True))
        checks.append(Check(key, "fp32", "fsdp2 2 processes vs 1", err, TOLERANCE, err <= TOLERANCE))
    result = {
        "launcher": "torch.distributed.run (gloo, CPU)" if cpu else "accelerate launch --multi_gpu (NCCL)",
        "command": " ".join(cmds["two"]),
        "wall_seconds": times,
        "step_seconds_two_processes": [round(m["step_seconds"], 3) for m in two],
        "peak_memory_mib_two_processes": round(max(m["peak_memory_mib"] for m in two)),
    }
    return result, checks
