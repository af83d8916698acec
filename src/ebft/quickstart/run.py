"""``ebft quickstart``: EBFT against SFT on this machine's own Python sources, offline, in minutes.

Phases (each with its own progress bar):

1. corpus: the standard library's ``*.py`` files, split into training and held-out files by a hash of
   their path (deterministic, independent of which other files exist);
2. base model: a byte-level BPE tokenizer and a small Llama trained from scratch with cross-entropy;
3. fine-tuning from that base, on the same training documents in the same order, for the same number
   of optimizer steps with the same optimizer, both through the training loop (``ebft.train.loop.train``):
   (a) SFT (``ebft.sft``), (b) strided EBFT; both save a checkpoint at regular intervals;
4. evaluation (``ebft.evaluate``) of base, SFT and EBFT on held-out files, and of every checkpoint on a
   smaller probe set for the curves;
5. ``report.html``, ``summary.json`` and PNG plots.

``--minutes`` scales the step counts and evaluation sizes; the default fits in 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ebft.config import dump_config, parse_config
from ebft.errors import EbftError, TrainingInterrupted
from ebft.evaluate.output import write_json
from ebft.evaluate.run import evaluate
from ebft.modeling.source import local_model
from ebft.modes import mode_of
from ebft.quickstart import report
from ebft.quickstart.budget import (
    EVALUATED_MODELS,
    LOADS_PER_MODEL,
    PRETRAIN_STEP_SECONDS,
    Budget,
    Plan,
    Sizes,
    contention,
)
from ebft.quickstart.corpus import stdlib_corpus, within_budget, write_jsonl
from ebft.quickstart.examples import example_blocks
from ebft.quickstart.model import BaseChoice, resolve_base
from ebft.quickstart.plot import plot_run, require_pyplot
from ebft.quickstart.scratch import build_model_dir
from ebft.quickstart.settings import (
    EBFT,
    EBFT_RATIONALE,
    PRETRAINED_FINDING,
    PRETRAINED_FINETUNE,
    PRETRAINED_RATIONALE,
    SCRATCH_FINETUNE,
)
from ebft.sft.runner import mode as sft_mode
from ebft.train.loop import train
from ebft.train.reporting import Progress

log = logging.getLogger("ebft")

DEFAULT_MINUTES = 8.0
SEED = 0
MARKER = "quickstart.json"  # identifies a folder written by the quickstart (safe to overwrite)

# Model and data shapes: ~1.6M parameters, fast enough for minutes of CPU training.
VOCAB_SIZE = 2048
MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "max_positions": 512}
SEQUENCE_LEN = 256
PRETRAIN_BATCH = 16  # documents per pretraining step
# Rough characters per token of Python source under this tokenizer, to size the corpus to a budget.
CHARS_PER_TOKEN = 4


def _config(base_model: Path | str, data: Path, output_dir: Path, **train_keys):

    raw = {
        "base_model": str(base_model),
        "rl": "ebft",
        "ebft": dict(train_keys.pop("ebft", EBFT)),
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": SEQUENCE_LEN,
        "output_dir": str(output_dir),
        "bf16": False,
        "seed": SEED,
        "adam_beta2": 0.95,
        **train_keys,
    }
    return parse_config(raw, source="quickstart")


def pretrain_config(init: Path, data: Path, out: Path, plan: Plan):
    return _config(
        init,
        data,
        out,
        micro_batch_size=PRETRAIN_BATCH,
        max_steps=plan.pretrain_steps,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        warmup_steps=max(1, plan.pretrain_steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, plan.pretrain_steps // 12),
    )


def finetune_config(base: Path | str, data: Path, out: Path, plan: Plan, keys: dict = SCRATCH_FINETUNE):
    """The one config both fine-tuning runs read (SFT ignores the RL keys); ``keys`` as SCRATCH_FINETUNE."""
    return _config(
        base,
        data,
        out,
        **keys,
        max_steps=plan.finetune_steps,
        lr_scheduler="constant_with_warmup",
        warmup_steps=max(1, plan.finetune_steps // 20),
        save_steps=plan.save_every,
        logging_steps=max(1, plan.finetune_steps // 10),
    )


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide the per-file progress bars of transformers and datasets while the phases show their own."""
    import datasets
    import transformers

    datasets_was = not datasets.is_progress_bar_enabled()
    transformers_was = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_was:
            datasets.enable_progress_bars()
        if transformers_was:
            transformers.utils.logging.enable_progress_bar()


def _prepare_out(out: Path) -> None:
    """Start from an empty folder; only a previous quickstart's output may be replaced."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise EbftError(f"--out {out}: the folder is not empty and was not written by ebft quickstart")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _checkpoints(run_dir: Path, final_step: int) -> list[tuple[int, Path]]:
    """(step, folder) of every saved checkpoint of a run, the final model last (once: a checkpoint of the
    last step holds the same weights)."""
    found = []
    for path in run_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and path.is_dir() and int(suffix) < final_step:
            found.append((int(suffix), path))
    return sorted(found) + [(final_step, run_dir)]


@dataclass
class QuickstartResult:
    out_dir: Path
    report: Path
    summary: dict


class Clock:
    """Wall and CPU seconds of each phase (CPU time of this process: the wall time on an idle machine)."""

    def __init__(self) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = time.perf_counter() - t0
        self.cpu_seconds[name] = time.process_time() - c0


def run_quickstart(
    out_dir: str | Path, minutes: float = DEFAULT_MINUTES, *, model: str | None = None, console=None
) -> QuickstartResult:
    """Run every phase into ``out_dir``; returns where the report is and the summary it shows.

    ``model``: the base model (hub id, folder or ``.gguf``); by default SmolLM2-135M-Instruct when it is
    installed, else a small model trained from scratch (``quickstart.model.resolve_base``). The sizes follow
    ``quickstart.budget``: planned for ``minutes`` on an idle machine, re-planned from measured times."""
    import torch

    require_pyplot()  # the report needs matplotlib: fail now with the install hint, not after minutes of training

    out = Path(out_dir).resolve()
    _prepare_out(out)
    guess = contention()
    choice = _fitting_base(resolve_base(model), minutes, guess)
    if choice.source is None:
        log.info("%s: training a small model from scratch", choice.origin)
    else:
        log.info("base model: %s (%s)", choice.source, choice.origin)
    plan = Plan.for_minutes(minutes) if choice.source is None else Plan.for_pretrained(minutes)
    (out / MARKER).write_text(json.dumps({"minutes": minutes, "plan": asdict(plan)}, indent=2))
    clock = Clock()
    torch.manual_seed(SEED)

    with _quiet_libraries():
        if choice.source is None:
            base, files, pre, pre_cfg, budget = _scratch_base(out, plan, clock, guess, console)
            keys, rationale, finding = SCRATCH_FINETUNE, EBFT_RATIONALE, None
        else:
            with (
                clock.phase("corpus + base model"),
                Progress(2, description="corpus + base model", console=console) as bar,
            ):
                base = local_model(choice.source, "--model")
                bar.advance(1)
                all_train, heldout_files = stdlib_corpus()
                chars = 3 * plan.finetune_steps * PRETRAINED_FINETUNE["sequence_len"] * CHARS_PER_TOKEN
                train_files = within_budget(all_train, chars)
                files = (
                    write_jsonl(out / "data" / "train.jsonl", train_files),
                    write_jsonl(out / "data" / "heldout.jsonl", heldout_files),
                    train_files,
                    all_train,
                    heldout_files,
                )
                bar.advance(1)
            budget = plan.budget(time.perf_counter(), guess)
            pre = pre_cfg = None
            keys, rationale, finding = PRETRAINED_FINETUNE, PRETRAINED_RATIONALE, PRETRAINED_FINDING
        train_data, heldout_data, train_files, all_train, heldout_files = files
        plan = plan.with_steps(budget.plan_steps(time.perf_counter()))
        ebft, sft, ft_cfg = _finetune(base, train_data, out, plan, keys, budget, clock, console)
        eval_cfg = ft_cfg.model_copy(
            update={"datasets": [ft_cfg.datasets[0].model_copy(update={"path": str(heldout_data)})]}
        )
        configs = out / "configs"
        configs.mkdir(exist_ok=True)
        for name, cfg in (("pretrain", pre_cfg), ("finetune", ft_cfg), ("evaluate", eval_cfg)):
            if cfg is not None:
                (configs / f"{name}.yaml").write_text(dump_config(cfg))

        runs = {"sft": (out / "sft", sft.steps), "ebft": (out / "ebft", ebft.steps)}
        todo = {name: _checkpoints(run_dir, steps) for name, (run_dir, steps) in runs.items()}
        sizes = budget.plan_evaluation(time.perf_counter(), ebft.steps, sum(len(v) for v in todo.values()))
        finals, example = _final_evaluation(eval_cfg, out, sizes, budget, clock, console)
        curves = _curves(eval_cfg, todo, sizes, budget, clock, console)

        # 5. Plots and report.
        with clock.phase("report"):
            run_plots = {name: plot_run(run_dir) for name, (run_dir, _) in runs.items()}
            if pre is not None:
                run_plots["pretrain"] = plot_run(base)
            summary = {
                "minutes": minutes,
                "plan": asdict(plan),
                "budget": _budget_summary(budget, sizes, clock),
                "corpus": {
                    "root": sysconfig.get_paths()["stdlib"],
                    "train_files": len(train_files),
                    "train_files_available": len(all_train),
                    "heldout_files": len(heldout_files),
                    "heldout_paths": [f.path for f in heldout_files],
                },
                "model": _model_summary(choice, Path(base), ft_cfg.sequence_len),
                "pretrain": None
                if pre is None
                else {"steps": pre.steps, "planned_steps": plan.pretrain_steps, "final": pre.last_metrics},
                "finetune": {
                    "steps": {"sft": sft.steps, "ebft": ebft.steps},
                    "planned_steps": plan.finetune_steps,
                    "documents_per_step": ft_cfg.micro_batch_size * ft_cfg.gradient_accumulation_steps,
                    "learning_rate": ft_cfg.learning_rate,
                    "lr_scheduler": ft_cfg.lr_scheduler,
                    "adapter": ft_cfg.adapter,
                    "lora_r": ft_cfg.lora_r if ft_cfg.adapter else None,
                    "ebft": dict(keys["ebft"]),
                    "rationale": rationale,
                    "finding": finding,
                },
                "evaluation": {name: r.to_json() for name, r in finals.items()},
                "comparison": report.compare(finals),
                "example": example,
                "curves": curves,
            }
            summary["plots"] = report.write_plots(out, summary, run_plots)
        clock.seconds["total"] = time.perf_counter() - clock.started
        clock.cpu_seconds["total"] = time.process_time() - clock.cpu_started
        summary["seconds"], summary["cpu_seconds"] = clock.seconds, clock.cpu_seconds
        summary["budget"]["total_seconds"] = clock.seconds["total"]
        (out / "summary.json").write_text(json.dumps(report.json_safe(summary), indent=2) + "\n")
        path = out / "report.html"
        path.write_text(report.render_html(summary), encoding="utf-8")
    report.print_summary(summary, console)
    return QuickstartResult(out_dir=out, report=path, summary=summary)


def _fitting_base(choice: BaseChoice, minutes: float, guess: float) -> BaseChoice:
    """``choice``, unless it is the pretrained model found by default and even its smallest plan cannot end
    within ``minutes`` at the guessed slowdown: then the from-scratch model, with the reason as its origin.
    A model named with ``--model`` is kept (the report then states the overrun)."""
    plan = Plan.for_pretrained(minutes)
    if choice.source is None or plan.fits(guess):
        return choice
    needed = plan.floor_seconds(guess)
    if choice.origin == "--model":
        log.warning(
            "the smallest plan for %s needs about %.0f s on this machine; --minutes %g budgets %.0f s: it will overrun",
            choice.source,
            needed,
            minutes,
            60 * minutes,
        )
        return choice
    return BaseChoice(
        None,
        f"{choice.origin} was found, but even its smallest run needs about "
        f"{needed:.0f} s on this machine (measured {guess:.1f}x slower than idle) and --minutes {minutes:g} "
        f"budgets {60 * minutes:.0f} s; run with --minutes {math.ceil(needed / 60)} or more to fine-tune it",
    )


def _finetune(base, train_data: Path, out: Path, plan: Plan, keys: dict, budget: Budget, clock: Clock, console):
    """EBFT for the planned steps, then SFT for the steps EBFT reached (same config, same documents in the
    same order): the expensive run first, so that a cut never leaves the two runs unequal."""
    ft_cfg = finetune_config(base, train_data, out / "ebft", plan, keys)
    with clock.phase("ebft"):
        try:
            ebft = train(ft_cfg, mode_of(ft_cfg), console=console)
        except TrainingInterrupted as exc:
            # train's own message suggests resuming with `ebft train`; the quickstart has no such entry point.
            raise TrainingInterrupted(
                f"quickstart interrupted during EBFT fine-tuning; run `ebft quickstart --out {out}` again to "
                "start over",
                exc.signum,
            ) from None
    budget.record(ebft.steps * plan.costs.ebft_step + plan.costs.model, clock.seconds["ebft"])
    sft_cfg = ft_cfg.model_copy(update={"output_dir": str(out / "sft"), "max_steps": ebft.steps})
    with clock.phase("sft"):
        sft = train(sft_cfg, sft_mode("sft"), console=console)
    budget.record(sft.steps * plan.costs.sft_step + plan.costs.model, clock.seconds["sft"])
    return ebft, sft, ft_cfg


def _final_evaluation(eval_cfg, out: Path, sizes: Sizes, budget: Budget, clock: Clock, console):
    """Base, SFT and EBFT on ``sizes.heldout_docs`` held-out documents, and the example block."""
    finals = {}
    checkpoints = {"base": None, "sft": out / "sft", "ebft": out / "ebft"}
    with clock.phase("evaluate"):
        for name, checkpoint in checkpoints.items():
            result = evaluate(
                eval_cfg,
                checkpoint=checkpoint,
                split="train",
                max_docs=sizes.heldout_docs,
                console=console,
                description=f"evaluate {name}",
            )
            write_json(result, out / "eval" / f"{name}.json")
            finals[name] = result
    with clock.phase("example"), Progress(len(checkpoints), description="example block", console=console) as bar:
        first_doc = finals["base"].documents[0]["index"]
        example = example_blocks(eval_cfg, checkpoints, first_doc, on_model=lambda: bar.advance(1))
    costs = budget.costs
    predicted = EVALUATED_MODELS * (sizes.heldout_docs * costs.eval_doc + LOADS_PER_MODEL * costs.model)
    budget.record(predicted, clock.seconds["evaluate"] + clock.seconds["example"])
    return finals, example


def _curves(eval_cfg, todo: dict, sizes: Sizes, budget: Budget, clock: Clock, console) -> dict[str, list[dict]]:
    """Held-out metrics of the base model and of every saved checkpoint on ``sizes.probe_docs`` documents
    (none when the budget left no time for them)."""
    if sizes.probe_docs == 0:
        return {}
    from rich.console import Console

    quiet = Console(quiet=True)
    total = 1 + sum(len(v) for v in todo.values())
    with clock.phase("probe checkpoints"), Progress(total, description="probe checkpoints", console=console) as bar:

        def probe(checkpoint: Path | None) -> dict:
            result = evaluate(eval_cfg, checkpoint=checkpoint, split="train", max_docs=sizes.probe_docs, console=quiet)
            bar.advance(1)
            return result.metrics

        start_point = {"step": 0, **probe(None)}
        curves = {
            name: [start_point] + [{"step": step, **probe(path)} for step, path in points]
            for name, points in todo.items()
        }
    budget.record(
        total * (sizes.probe_docs * budget.costs.eval_doc + budget.costs.model), clock.seconds["probe checkpoints"]
    )
    return curves


def _budget_summary(budget: Budget, sizes: Sizes, clock: Clock) -> dict:
    """What the report says about time: the budget, what it was spent on, the slowdown and the cuts."""
    fixed = [name for name in ("corpus + base model", "corpus + tokenizer") if name in clock.seconds]
    return {
        "seconds": budget.seconds,
        "spent_seconds": time.perf_counter() - budget.start,
        "fixed_seconds": {name: clock.seconds[name] for name in fixed},
        "slowdown_guess": budget.guess,
        "slowdown": budget.slowdown,
        "ideal": asdict(budget.ideal),
        "floors": asdict(budget.floors),
        "final": asdict(sizes),
        "cuts": list(budget.cuts),
    }


def _scratch_base(out: Path, plan: Plan, clock: Clock, guess: float, console):
    """Phases 1-2 without a pretrained model: corpus, tokenizer, a small Llama pretrained from scratch (the
    budget's first phase, capped by ``plan.pretrain_cap``: what the smallest rest of the run leaves).

    Returns (base folder, (train data, held-out data, train files, all train files, held-out files),
    pretraining result, pretraining config, the budget started before pretraining)."""

    with clock.phase("corpus + tokenizer"), Progress(2, description="corpus + tokenizer", console=console) as bar:
        all_train, heldout_files = stdlib_corpus()
        # Training text worth reading: what pretraining can see in 1.5 passes (the whole corpus by default).
        chars = int(1.5 * plan.pretrain_steps * PRETRAIN_BATCH * SEQUENCE_LEN * CHARS_PER_TOKEN)
        train_files = within_budget(all_train, chars)
        train_data = write_jsonl(out / "data" / "train.jsonl", train_files)
        heldout_data = write_jsonl(out / "data" / "heldout.jsonl", heldout_files)
        bar.advance(1)
        init = build_model_dir(out / "init", (f.text for f in train_files), vocab_size=VOCAB_SIZE, seed=SEED, **MODEL)
        bar.advance(1)
    budget = plan.budget(time.perf_counter(), guess)
    pre_cfg = pretrain_config(init, train_data, out / "base", plan)
    with clock.phase("pretrain"):
        pre = train(pre_cfg, sft_mode("pretrain"), console=console, time_up=budget.pretrain_time_up(plan))
    budget.record(pre.steps * PRETRAIN_STEP_SECONDS + plan.costs.model, clock.seconds["pretrain"])
    if pre.steps < plan.pretrain_steps:
        budget.cuts.append(f"pretraining steps {plan.pretrain_steps} -> {pre.steps} (its time cap)")
    files = (train_data, heldout_data, train_files, all_train, heldout_files)
    return out / "base", files, pre, pre_cfg, budget


def _model_summary(choice: BaseChoice, folder: Path, sequence_len: int) -> dict:
    """What the report says about the base model (read from its config.json)."""
    config = json.loads((folder / "config.json").read_text())
    return {
        "source": choice.source or "from scratch",
        "origin": choice.origin,
        "pretrained": choice.source is not None,
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        "parameters": _parameter_count(folder),
        "sequence_len": sequence_len,
    }


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
