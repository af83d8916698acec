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
from ebft.quickstart.corpus import stdlib_corpus, within_budget, write_jsonl
from ebft.quickstart.examples import example_blocks
from ebft.quickstart.model import BaseChoice, resolve_base
from ebft.quickstart.plot import plot_run, require_pyplot
from ebft.quickstart.scratch import build_model_dir
from ebft.quickstart.settings import (
    EBFT,
    EBFT_RATIONALE,
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


@dataclass(frozen=True)
class Plan:
    """Sizes derived from the time budget (calibrated on 2 CPU cores; see ``for_minutes``)."""

    minutes: float
    pretrain_steps: int
    pretrain_seconds_cap: float
    finetune_steps: int
    save_every: int
    heldout_docs: int
    probe_docs: int

    @property
    def corpus_chars(self) -> int:
        """Training text worth reading: what pretraining can see in 1.5 passes (the whole corpus by default)."""
        return int(1.5 * self.pretrain_steps * PRETRAIN_BATCH * SEQUENCE_LEN * CHARS_PER_TOKEN)

    @classmethod
    def for_minutes(cls, minutes: float) -> Plan:
        """Sizes that take about ``minutes`` of wall time on an idle 2-core CPU machine.

        Per minute: 100 pretraining steps of 16 x 256 tokens (~30 s), 25 fine-tuning steps of 4
        documents for each method (~21 s for EBFT, ~3 s for SFT), 10 held-out documents for the final
        evaluation of the three models and 2.5 for each checkpoint on the curves (~7 s together).
        Pretraining stops at 1.5x its expected time; ``run_quickstart`` then scales the rest down.
        """
        if minutes <= 0:
            raise EbftError(f"--minutes must be > 0, got {minutes:g}")
        finetune = max(2, round(25 * minutes))
        return cls(
            minutes=minutes,
            pretrain_steps=max(4, round(100 * minutes)),
            pretrain_seconds_cap=45.0 * minutes,
            finetune_steps=finetune,
            save_every=max(1, finetune // 5),
            heldout_docs=max(4, round(10 * minutes)),
            probe_docs=max(2, round(2.5 * minutes)),
        )

    @classmethod
    def for_pretrained(cls, minutes: float) -> Plan:
        """Sizes for fine-tuning a pretrained ~135M model (no pretraining phase), about ``minutes`` of wall time
        on 2 idle cores.

        Measured single-thread CPU time on SmolLM2-135M (128-token windows, one document per step): an EBFT
        step 12 s, an SFT step 1.4 s, a held-out document 5.5 s per model, loading a model 2 s, converting
        the GGUF once 21 s. Per minute: 3.5 fine-tuning steps for each method, 0.75 held-out documents for
        the final evaluation of the three models and 0.25 for each of the five curve points (base, middle
        and end of each run). At the default 8 minutes that is 28 steps, 6 and 2 documents: about 9.7
        minutes on one thread, less with two.
        """
        if minutes <= 0:
            raise EbftError(f"--minutes must be > 0, got {minutes:g}")
        finetune = max(2, round(3.5 * minutes))
        return cls(
            minutes=minutes,
            pretrain_steps=0,
            pretrain_seconds_cap=0.0,
            finetune_steps=finetune,
            save_every=max(1, finetune // 2),
            heldout_docs=max(2, round(0.75 * minutes)),
            probe_docs=max(1, round(0.25 * minutes)),
        )

    def scaled(self, fraction: float) -> Plan:
        """The fine-tuning and evaluation part shrunk by ``fraction`` (for a machine slower than planned)."""
        finetune = max(2, round(self.finetune_steps * fraction))
        return Plan(
            minutes=self.minutes,
            pretrain_steps=self.pretrain_steps,
            pretrain_seconds_cap=self.pretrain_seconds_cap,
            finetune_steps=finetune,
            save_every=max(1, finetune // 5),
            heldout_docs=max(4, round(self.heldout_docs * fraction)),
            probe_docs=max(2, round(self.probe_docs * fraction)),
        )


def _config(base_model: Path, data: Path, output_dir: Path, **train_keys):

    raw = {
        "base_model": str(base_model),
        "rl": "ebft",
        "ebft": dict(EBFT),
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


def run_quickstart(
    out_dir: str | Path, minutes: float = DEFAULT_MINUTES, *, model: str | None = None, console=None
) -> QuickstartResult:
    """Run every phase into ``out_dir``; returns where the report is and the summary it shows.

    ``model``: the base model (hub id, folder or ``.gguf``); by default SmolLM2-135M-Instruct when it is
    installed, else a small model trained from scratch (``quickstart.model.resolve_base``)."""
    import torch
    from rich.console import Console

    require_pyplot()  # the report needs matplotlib: fail now with the install hint, not after minutes of training

    choice = resolve_base(model)
    if choice.source is None:
        log.info("%s: training a small model from scratch", choice.origin)
    else:
        log.info("base model: %s (%s)", choice.source, choice.origin)
    plan = Plan.for_minutes(minutes) if choice.source is None else Plan.for_pretrained(minutes)
    out = Path(out_dir).resolve()
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"minutes": minutes, "plan": asdict(plan)}, indent=2))
    quiet = Console(quiet=True)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}  # CPU time of this process per phase: the wall time on an idle machine
    started, cpu_started = time.perf_counter(), time.process_time()

    @contextmanager
    def timed(phase: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        seconds[phase] = time.perf_counter() - t0
        cpu_seconds[phase] = time.process_time() - c0

    torch.manual_seed(SEED)

    with _quiet_libraries():
        notes = []
        if choice.source is None:
            base, files, pre, pre_cfg = _scratch_base(out, plan, seconds, cpu_seconds, console)
            train_data, heldout_data, train_files, all_train, heldout_files = files
            if pre.steps < plan.pretrain_steps:
                # The machine is slower than planned (or busy): keep the total time in budget by shrinking
                # what follows by the same factor, and say so in the report.
                fraction = pre.steps / plan.pretrain_steps
                notes.append(
                    f"This machine ran slower than planned: pretraining reached {pre.steps} of "
                    f"{plan.pretrain_steps} steps within its time cap, so fine-tuning steps and evaluation sizes "
                    f"were scaled by {fraction:.2f}."
                )
                plan = plan.scaled(fraction)
            keys, rationale = SCRATCH_FINETUNE, EBFT_RATIONALE
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            with Progress(2, description="corpus + base model", console=console) as bar:
                base = local_model(choice.source, "--model")
                bar.advance(1)
                all_train, heldout_files = stdlib_corpus()
                chars = 3 * plan.finetune_steps * PRETRAINED_FINETUNE["sequence_len"] * CHARS_PER_TOKEN
                train_files = within_budget(all_train, chars)
                train_data = write_jsonl(out / "data" / "train.jsonl", train_files)
                heldout_data = write_jsonl(out / "data" / "heldout.jsonl", heldout_files)
                bar.advance(1)
            seconds["corpus + base model"] = time.perf_counter() - t0
            cpu_seconds["corpus + base model"] = time.process_time() - c0
            pre = pre_cfg = None
            keys, rationale = PRETRAINED_FINETUNE, PRETRAINED_RATIONALE

        # 3. Fine-tuning: same config, same documents, same steps.
        ft_cfg = finetune_config(base, train_data, out / "sft", plan, keys)
        with timed("sft"):
            sft = train(ft_cfg, sft_mode("sft"), console=console)
        ebft_cfg = ft_cfg.model_copy(update={"output_dir": str(out / "ebft")})
        with timed("ebft"):
            try:
                ebft = train(ebft_cfg, mode_of(ebft_cfg), console=console)
            except TrainingInterrupted as exc:
                # train's own message suggests resuming with `ebft train`; the quickstart has no such entry point.
                raise TrainingInterrupted(
                    f"quickstart interrupted during EBFT fine-tuning; run `ebft quickstart --out {out}` again to "
                    "start over",
                    exc.signum,
                ) from None

        # 4. Evaluation on held-out files.
        eval_cfg = ft_cfg.model_copy(
            update={"datasets": [ft_cfg.datasets[0].model_copy(update={"path": str(heldout_data)})]}
        )
        configs = out / "configs"
        configs.mkdir(exist_ok=True)

        for name, cfg in (("pretrain", pre_cfg), ("finetune", ebft_cfg), ("evaluate", eval_cfg)):
            if cfg is not None:
                (configs / f"{name}.yaml").write_text(dump_config(cfg))

        finals = {}
        with timed("evaluate"):
            for name, checkpoint in (("base", None), ("sft", out / "sft"), ("ebft", out / "ebft")):
                result = evaluate(
                    eval_cfg,
                    checkpoint=checkpoint,
                    split="train",
                    max_docs=plan.heldout_docs,
                    console=console,
                    description=f"evaluate {name}",
                )
                write_json(result, out / "eval" / f"{name}.json")
                finals[name] = result

        checkpoints = {"base": None, "sft": out / "sft", "ebft": out / "ebft"}
        with timed("example"), Progress(len(checkpoints), description="example block", console=console) as bar:
            first_doc = finals["base"].documents[0]["index"]
            example = example_blocks(eval_cfg, checkpoints, first_doc, on_model=lambda: bar.advance(1))

        runs = {"sft": (out / "sft", sft.steps), "ebft": (out / "ebft", ebft.steps)}
        todo = {name: _checkpoints(run_dir, steps) for name, (run_dir, steps) in runs.items()}
        curves: dict[str, list[dict]] = {}
        total_probes = 1 + sum(len(v) for v in todo.values())
        probes = Progress(total_probes, description="probe checkpoints", console=console)
        with timed("probe checkpoints"), probes as bar:

            def probe(checkpoint: Path | None) -> dict:
                result = evaluate(
                    eval_cfg, checkpoint=checkpoint, split="train", max_docs=plan.probe_docs, console=quiet
                )
                bar.advance(1)
                return result.metrics

            start_point = {"step": 0, **probe(None)}
            for name, points in todo.items():
                curves[name] = [start_point] + [{"step": step, **probe(path)} for step, path in points]

        # 5. Plots and report.
        with timed("report"):
            run_plots = {name: plot_run(run_dir) for name, (run_dir, _) in runs.items()}
            if pre is not None:
                run_plots["pretrain"] = plot_run(base)
            summary = {
                "minutes": minutes,
                "plan": asdict(plan),
                "notes": notes,
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
                    "documents_per_step": ft_cfg.micro_batch_size * ft_cfg.gradient_accumulation_steps,
                    "learning_rate": ft_cfg.learning_rate,
                    "lr_scheduler": ft_cfg.lr_scheduler,
                    "adapter": ft_cfg.adapter,
                    "lora_r": ft_cfg.lora_r if ft_cfg.adapter else None,
                    "ebft": dict(EBFT),
                    "rationale": rationale,
                },
                "evaluation": {name: r.to_json() for name, r in finals.items()},
                "comparison": report.compare(finals),
                "example": example,
                "curves": curves,
            }
            summary["plots"] = report.write_plots(out, summary, run_plots)
        seconds["total"] = time.perf_counter() - started
        cpu_seconds["total"] = time.process_time() - cpu_started
        summary["seconds"], summary["cpu_seconds"] = seconds, cpu_seconds
        (out / "summary.json").write_text(json.dumps(report.json_safe(summary), indent=2) + "\n")
        path = out / "report.html"
        path.write_text(report.render_html(summary), encoding="utf-8")
    report.print_summary(summary, console)
    return QuickstartResult(out_dir=out, report=path, summary=summary)


def _scratch_base(out: Path, plan: Plan, seconds: dict, cpu_seconds: dict, console):
    """Phases 1-2 without a pretrained model: corpus, tokenizer, a small Llama pretrained from scratch.

    Returns (base folder, (train data, held-out data, train files, all train files, held-out files),
    pretraining result, pretraining config)."""

    t0, c0 = time.perf_counter(), time.process_time()
    with Progress(2, description="corpus + tokenizer", console=console) as bar:
        all_train, heldout_files = stdlib_corpus()
        train_files = within_budget(all_train, plan.corpus_chars)
        train_data = write_jsonl(out / "data" / "train.jsonl", train_files)
        heldout_data = write_jsonl(out / "data" / "heldout.jsonl", heldout_files)
        bar.advance(1)
        init = build_model_dir(out / "init", (f.text for f in train_files), vocab_size=VOCAB_SIZE, seed=SEED, **MODEL)
        bar.advance(1)
    seconds["corpus + tokenizer"] = time.perf_counter() - t0
    cpu_seconds["corpus + tokenizer"] = time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    pre_cfg = pretrain_config(init, train_data, out / "base", plan)
    pre = train(pre_cfg, sft_mode("pretrain"), console=console, max_seconds=plan.pretrain_seconds_cap)
    seconds["pretrain"] = time.perf_counter() - t0
    cpu_seconds["pretrain"] = time.process_time() - c0
    files = (train_data, heldout_data, train_files, all_train, heldout_files)
    return out / "base", files, pre, pre_cfg


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
