"""``ebft quickstart``: EBFT against SFT on this machine's own Python sources, offline, in minutes.

Phases (each with its own progress bar):

1. corpus: the standard library's ``*.py`` files, split into training and held-out files by a hash of
   their path (deterministic, independent of which other files exist);
2. base model: a byte-level BPE tokenizer and a small Llama trained from scratch with cross-entropy;
3. fine-tuning from that base, on the same training documents in the same order, for the same number
   of optimizer steps with the same optimizer: (a) SFT (``quickstart.sft``), (b) strided EBFT
   (``ebft.trainer.train``); both save a checkpoint at regular intervals;
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

from ebft.errors import EbftError, TrainingInterrupted
from ebft.quickstart.corpus import stdlib_corpus, within_budget, write_jsonl

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

# Strided EBFT with the paper's layout and sampling (c = s = g = 8, n = 4, T = 0.6, 25/50/75% layers);
# the other choices and why are in EBFT_RATIONALE, which the report prints.
EBFT = {
    "mode": "strided",
    "stride": 8,
    "context_length": 8,
    "generate_max_len": 8,
    "n_samples_per_prompt": 4,
    "temperature": 0.6,
    "feature_layers": [0.25, 0.5, 0.75],
    "embed_method": "mean_pooling",
    "use_whitening": False,
    "alignment_coef": 1.0,
    "diversity_coef": 1.0,
    "ce_coef": 0.1,
    "advantage_estimator": "rloo",
}
EBFT_RATIONALE = (
    "The layout and sampling are the paper's. Features are averaged over each block's tokens (the paper's "
    "translation setting) because, for a model this small and a few minutes of training, the last token alone "
    "gave EBFT no measurable signal in our trials. ce_coef = 0.1 (EBFT's objective is the policy gradient plus "
    "0.1 x the cross-entropy) is the top of the paper's range. Without whitening, the reward is exactly the "
    "policy-gradient reward of the CFM loss reported above (reference identity 1 - mean(a - d/2)). Both runs "
    "share the learning rate 2e-5: at 1e-4 EBFT's noisy updates raised both CE and CFM, and SFT lowered CE at "
    "neither rate by more than noise (the base model was pretrained on the same files)."
)


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
    from ebft.config import parse_config

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


def finetune_config(base: Path, data: Path, out: Path, plan: Plan):
    """The one config both fine-tuning runs read (SFT ignores the RL keys)."""
    return _config(
        base,
        data,
        out,
        micro_batch_size=4,
        max_steps=plan.finetune_steps,
        learning_rate=2e-5,
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


def run_quickstart(out_dir: str | Path, minutes: float = DEFAULT_MINUTES, *, console=None) -> QuickstartResult:
    """Run every phase into ``out_dir``; returns where the report is and the summary it shows."""
    import torch
    from rich.console import Console

    from ebft.evaluate.output import write_json
    from ebft.evaluate.run import evaluate
    from ebft.metrics import Progress
    from ebft.quickstart import report
    from ebft.quickstart.plot import plot_run, require_pyplot
    from ebft.quickstart.scratch import build_model_dir
    from ebft.quickstart.sft import train_sft
    from ebft.trainer import train

    require_pyplot()  # the report needs matplotlib: fail now with the install hint, not after minutes of training

    plan = Plan.for_minutes(minutes)
    out = Path(out_dir).resolve()
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"minutes": minutes, "plan": asdict(plan)}, indent=2))
    quiet = Console(quiet=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(SEED)

    with _quiet_libraries():
        # 1-2a. Corpus, tokenizer, random model.
        t0 = time.perf_counter()
        with Progress(2, description="corpus + tokenizer", console=console) as bar:
            all_train, heldout_files = stdlib_corpus()
            train_files = within_budget(all_train, plan.corpus_chars)
            train_data = write_jsonl(out / "data" / "train.jsonl", train_files)
            heldout_data = write_jsonl(out / "data" / "heldout.jsonl", heldout_files)
            bar.advance(1)
            init = build_model_dir(
                out / "init", (f.text for f in train_files), vocab_size=VOCAB_SIZE, seed=SEED, **MODEL
            )
            bar.advance(1)
        seconds["corpus + tokenizer"] = time.perf_counter() - t0

        # 2b. Pretraining from scratch.
        t0 = time.perf_counter()
        pre_cfg = pretrain_config(init, train_data, out / "base", plan)
        pre = train_sft(pre_cfg, console=console, description="pretrain", time_limit_s=plan.pretrain_seconds_cap)
        seconds["pretrain"] = time.perf_counter() - t0
        base = out / "base"
        notes = []
        if pre.steps < plan.pretrain_steps:
            # The machine is slower than planned (or busy): keep the total time in budget by shrinking
            # what follows by the same factor, and say so in the report.
            fraction = pre.steps / plan.pretrain_steps
            notes.append(
                f"This machine ran slower than planned: pretraining reached {pre.steps} of {plan.pretrain_steps} "
                f"steps within its time cap, so fine-tuning steps and evaluation sizes were scaled by {fraction:.2f}."
            )
            plan = plan.scaled(fraction)

        # 3. Fine-tuning: same config, same documents, same steps.
        ft_cfg = finetune_config(base, train_data, out / "sft", plan)
        t0 = time.perf_counter()
        sft = train_sft(ft_cfg, console=console, description="sft")
        seconds["sft"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ebft_cfg = ft_cfg.model_copy(update={"output_dir": str(out / "ebft")})
        try:
            ebft = train(ebft_cfg, console=console)
        except TrainingInterrupted:
            # train's own message suggests resuming with `ebft train`; the quickstart has no such entry point.
            raise TrainingInterrupted(
                f"quickstart interrupted during EBFT fine-tuning; run `ebft quickstart --out {out}` again to start over"
            ) from None
        seconds["ebft"] = time.perf_counter() - t0

        # 4. Evaluation on held-out files.
        eval_cfg = ft_cfg.model_copy(
            update={"datasets": [ft_cfg.datasets[0].model_copy(update={"path": str(heldout_data)})]}
        )
        configs = out / "configs"
        configs.mkdir(exist_ok=True)
        from ebft.config import dump_config

        for name, cfg in (("pretrain", pre_cfg), ("finetune", ebft_cfg), ("evaluate", eval_cfg)):
            (configs / f"{name}.yaml").write_text(dump_config(cfg))

        t0 = time.perf_counter()
        finals = {}
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
        seconds["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        runs = {"sft": (out / "sft", sft.steps), "ebft": (out / "ebft", ebft.steps)}
        todo = {name: _checkpoints(run_dir, steps) for name, (run_dir, steps) in runs.items()}
        curves: dict[str, list[dict]] = {}
        with Progress(1 + sum(len(v) for v in todo.values()), description="probe checkpoints", console=console) as bar:

            def probe(checkpoint: Path | None) -> dict:
                result = evaluate(
                    eval_cfg, checkpoint=checkpoint, split="train", max_docs=plan.probe_docs, console=quiet
                )
                bar.advance(1)
                return result.metrics

            start_point = {"step": 0, **probe(None)}
            for name, points in todo.items():
                curves[name] = [start_point] + [{"step": step, **probe(path)} for step, path in points]
        seconds["probe checkpoints"] = time.perf_counter() - t0

        # 5. Plots and report.
        t0 = time.perf_counter()
        run_plots = {name: plot_run(run_dir) for name, (run_dir, _) in runs.items()}
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
            "model": {
                **MODEL,
                "vocab_size": VOCAB_SIZE,
                "parameters": _parameter_count(init),
                "sequence_len": SEQUENCE_LEN,
            },
            "pretrain": {"steps": pre.steps, "planned_steps": plan.pretrain_steps, "final": pre.last_metrics},
            "finetune": {
                "steps": {"sft": sft.steps, "ebft": ebft.steps},
                "documents_per_step": ft_cfg.micro_batch_size * ft_cfg.gradient_accumulation_steps,
                "learning_rate": ft_cfg.learning_rate,
                "lr_scheduler": ft_cfg.lr_scheduler,
                "adapter": ft_cfg.adapter,
                "ebft": dict(EBFT),
                "rationale": EBFT_RATIONALE,
            },
            "evaluation": {name: r.to_json() for name, r in finals.items()},
            "comparison": report.compare(finals),
            "curves": curves,
        }
        summary["plots"] = report.write_plots(out, summary, run_plots)
        seconds["report"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - started
        summary["seconds"] = seconds
        (out / "summary.json").write_text(json.dumps(report.json_safe(summary), indent=2) + "\n")
        path = out / "report.html"
        path.write_text(report.render_html(summary), encoding="utf-8")
    report.print_summary(summary, console)
    return QuickstartResult(out_dir=out, report=path, summary=summary)


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
