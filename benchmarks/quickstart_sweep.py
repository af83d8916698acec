"""One arm of the quickstart experiment: fine-tune SmolLM2-135M-Instruct, evaluate on held-out files.

    python benchmarks/quickstart_sweep.py --name ebft_default --method ebft --steps 60 --seed 0
    python benchmarks/quickstart_sweep.py --name sft --method sft --steps 60 --seed 0 --learning_rate=3e-4
    python benchmarks/quickstart_sweep.py --name warm --method warm --sft-steps 40 --steps 20 --seed 0
    python benchmarks/quickstart_sweep.py --name base --method base          # the base model, evaluated once

Methods: ``sft`` (``ebft.train.loop.train`` with the SFT mode), ``ebft`` (``ebft.train.loop.train``), ``warm`` (SFT for
``--sft-steps``, then EBFT for ``--steps`` from its adapter, the base model as the feature network: the
paper's warm start), ``base`` (no training). Overrides: ``--KEY=VALUE`` for a top-level config key,
``--ebft.KEY=VALUE`` for the ``ebft:`` block (values are JSON). ``--repeat-doc`` trains on one training
document repeated (a problem whose reward must improve) instead of the corpus.

Every arm is evaluated the same way, whatever it trained with (the quickstart's evaluation settings, seed
0, so all arms see the same held-out documents and the same sampling streams):

* ``ebft.evaluate`` on ``--eval-docs`` held-out 128-token windows: unbiased CFM, alignment, diversity, CE;
* ``quickstart_generation``: ``--gen-samples`` bodies for each of ``--gen-prompts`` held-out functions:
  parse rate, finished rate, distinct-2, repeated lines.

Writes ``OUT/NAME/seed-S/result.json``: the config overrides, wall and CPU seconds per phase, the training
log (``metrics.jsonl`` rows) and the per-document / per-prompt evaluation numbers. ``quickstart_analyse.py``
turns these files into the tables of ``benchmarks/RESULTS.md`` and the plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_common import make_config, prepare_data, single_thread  # noqa: E402
from quickstart_generation import function_prompts, sample_completions, summarise  # noqa: E402

from ebft.evaluate.load import load_models  # noqa: E402
from ebft.evaluate.run import evaluate  # noqa: E402
from ebft.modes import mode_of  # noqa: E402
from ebft.quickstart.settings import EBFT  # noqa: E402
from ebft.sft.runner import mode as sft_mode  # noqa: E402
from ebft.train.loop import train  # noqa: E402

EVAL_SEED = 0


def parse() -> tuple[argparse.Namespace, dict, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--method", choices=("sft", "ebft", "warm", "base"), required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft-steps", type=int, default=0, help="SFT steps before EBFT (method warm)")
    p.add_argument("--sft-lr", type=float, default=None, help="learning rate of the SFT part of warm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", choices=("code", "prose"), default="code")
    p.add_argument("--repeat-doc", action="store_true")
    p.add_argument("--eval-docs", type=int, default=24)
    p.add_argument("--gen-prompts", type=int, default=16)
    p.add_argument("--gen-samples", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path("/tmp/ebft_quickstart_data"))
    p.add_argument("--out", type=Path, default=Path("/tmp/ebft_sweep"))
    p.add_argument(
        "--regenerate",
        action="store_true",
        help="only redo the generation measures of an existing result.json (its adapter is kept in the run folder)",
    )
    args, rest = p.parse_known_args()
    top, ebft = {}, {}
    for item in rest:
        key, _, value = item.removeprefix("--").partition("=")
        target = ebft if key.startswith("ebft.") else top
        target[key.removeprefix("ebft.")] = json.loads(value)
    return args, top, ebft


def repeated_document(train_path: Path, folder: Path) -> Path:
    """A dataset of one training file's first 128-token window, repeated (one row per line, not packed)."""
    first = json.loads(train_path.read_text(encoding="utf-8").splitlines()[3])
    path = folder / "repeat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((json.dumps({"text": first["text"][:2000]}) + "\n") * 400, encoding="utf-8")
    return path


def timed(phase: str, seconds: dict, fn, *a, **k):
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*a, **k)
    seconds[phase] = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    return result


def generation(eval_cfg, checkpoint, held_path: Path, args, seconds: dict) -> dict:
    tokenizer, policy, _, _ = load_models(eval_cfg, checkpoint, torch.device("cpu"))
    prompts = function_prompts(held_path, tokenizer, args.gen_prompts)
    sample = (policy, tokenizer, prompts, args.gen_samples, EBFT["temperature"], EVAL_SEED)
    completions = timed("generate", seconds, sample_completions, *sample)
    gen = summarise(completions)
    gen["prompts"] = [{"path": p.path, "name": p.name} for p in prompts]
    return gen


def regenerate(run_dir: Path, held_path: Path, args) -> None:
    result = json.loads((run_dir / "result.json").read_text())
    eval_cfg = make_config(held_path, run_dir / "eval", steps=1, seed=EVAL_SEED)
    seconds = result["seconds"]
    result["generation"] = generation(eval_cfg, result.get("checkpoint"), held_path, args, seconds)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{result['name']} seed {args.seed}: generation redone", flush=True)


def main() -> None:
    single_thread()
    args, top, ebft = parse()
    train_path, held_path = prepare_data(args.data, args.corpus)
    run_dir = args.out / args.name / f"seed-{args.seed}"
    if args.regenerate:
        regenerate(run_dir, held_path, args)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    data_keys = {}
    if args.repeat_doc:
        train_path = repeated_document(train_path, run_dir)
        data_keys["datasets"] = [{"path": str(train_path), "type": "ebft_pretrain.transform", "pack": False}]
    seconds: dict = {}
    logs: dict = {}
    checkpoint = None
    if args.method in ("sft", "warm"):
        sft_steps = args.steps if args.method == "sft" else args.sft_steps
        sft_keys = {**top, **({"learning_rate": args.sft_lr} if args.sft_lr else {})}
        cfg = make_config(train_path, run_dir / "sft", steps=sft_steps, seed=args.seed, **sft_keys, **data_keys)
        timed("sft", seconds, train, cfg, sft_mode("sft"))
        checkpoint = run_dir / "sft"
        logs["sft"] = [json.loads(x) for x in (checkpoint / "metrics.jsonl").read_text().splitlines()]
    if args.method in ("ebft", "warm"):
        keys = {**top, **data_keys}
        if args.method == "warm":
            keys["lora_model_dir"] = str(run_dir / "sft")
        cfg = make_config(train_path, run_dir / "ebft", steps=args.steps, ebft=ebft, seed=args.seed, **keys)
        timed("ebft", seconds, train, cfg, mode_of(cfg))
        checkpoint = run_dir / "ebft"
        logs["ebft"] = [json.loads(x) for x in (checkpoint / "metrics.jsonl").read_text().splitlines()]

    # Evaluation: the quickstart's settings whatever the arm trained with, seed fixed.
    eval_cfg = make_config(held_path, run_dir / "eval", steps=1, seed=EVAL_SEED)
    if args.repeat_doc:
        eval_cfg = make_config(train_path, run_dir / "eval", steps=1, seed=EVAL_SEED, **data_keys)
    result = timed(
        "evaluate",
        seconds,
        evaluate,
        eval_cfg,
        checkpoint=checkpoint,
        split="train",
        max_docs=1 if args.repeat_doc else args.eval_docs,
    )
    gen = {}
    if args.gen_prompts and not args.repeat_doc:
        gen = generation(eval_cfg, checkpoint, held_path, args, seconds)
    out = {
        "name": args.name,
        "method": args.method,
        "seed": args.seed,
        "steps": args.steps,
        "sft_steps": args.sft_steps if args.method == "warm" else (args.steps if args.method == "sft" else 0),
        "sft_lr": args.sft_lr,
        "overrides": {"top": top, "ebft": ebft},
        "corpus": args.corpus,
        "repeat_doc": args.repeat_doc,
        "seconds": seconds,
        "logs": logs,
        "eval": {"metrics": result.metrics, "documents": result.documents},
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "generation": gen,
    }
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))
    m = result.metrics
    print(
        f"{args.name} seed {args.seed}: cfm {m.get('cfm_loss'):.4f} ce {m.get('ce_loss'):.4f} "
        f"seconds {json.dumps(seconds)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
