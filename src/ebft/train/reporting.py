"""What a run reports: the console line, metrics.jsonl, TensorBoard / wandb, rollouts, progress bar.

Only the main process reports; every class here takes ``is_main`` (or is driven by a caller that
checks it) so that an ``accelerate launch`` on N processes prints and writes once, not N times.
Trackers (TensorBoard, wandb) are optional extras, imported only when the config asks for them.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import rich
import rich.progress
from rich.console import Console

from ebft.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

# Each console field: the metric keys to try in order (first present wins) and its template.
# Arrows give the direction a healthy run moves in: alignment and reward up, diversity (mean
# pairwise similarity of samples, so lower = more diverse) and the CFM loss (paper eq 2) down.
# Structured mode reports the combined reward as ``ebft/reward`` rather than ``ebft/mean_reward``.
_REWARD_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("ebft/alignment",), "align {:+.3f} ^"),
    (("ebft/diversity",), "divers {:+.3f} v"),
    (("ebft/cfm_loss",), "cfm {:.3f} v"),
    (("ebft/mean_reward", "ebft/reward"), "reward {:+.3f} ^"),
)
_TRAINING_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("loss",), "loss {:.4f}"),
    (("learning_rate",), "lr {:.2e}"),
    (("grad_norm",), "grad {:.2f}"),
    (("tokens_per_second",), "{:.0f} tok/s"),
)
# An evaluation's line: the held-out metrics of ``ebft evaluate`` (``eval/`` names), and how long it took.
_EVAL_FIELDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("eval/cfm_loss",), "cfm {:.4f} v"),
    (("eval/alignment",), "align {:+.3f} ^"),
    (("eval/diversity",), "divers {:+.3f} v"),
    (("eval/reward",), "reward {:+.3f} ^"),
    (("eval/ce_loss",), "ce {:.4f} v"),
    (("eval/perplexity",), "ppl {:.2f} v"),
    (("eval/completion_length",), "length {:.1f}"),
    (("eval/seconds",), "{:.1f} s"),
)


def _render_fields(metrics: Mapping[str, float | None], fields: Sequence[tuple[tuple[str, ...], str]]) -> list[str]:
    parts = []
    for keys, template in fields:
        value = next((metrics[k] for k in keys if metrics.get(k) is not None), None)
        if value is not None:
            parts.append(template.format(float(value)))
    return parts


def format_console_line(step: int, metrics: Mapping[str, float | None]) -> str:
    """One console line for a logged step, e.g. ``step 12 | align +0.412 ^ | ... | lr 1.00e-05``.

    Keys that are absent (or None) are left out, so the same function serves both modes and
    steps where some quantity was not computed.
    """
    parts = [f"step {step}"]
    parts += _render_fields(metrics, _REWARD_FIELDS)
    parts += _render_fields(metrics, _TRAINING_FIELDS)
    return " | ".join(parts)


def format_eval_line(step: int, metrics: Mapping[str, float | None]) -> str:
    """One console line for an evaluation, e.g. ``eval step 10 | cfm 0.5120 v | ... | ce 3.2100 v | 12.3 s``."""
    return " | ".join([f"eval step {step}", *_render_fields(metrics, _EVAL_FIELDS)])


def format_reward_line(metrics: Mapping[str, float | None]) -> str:
    """The reward-only line of structured mode: ``ebft reward | align +0.412 ^ | ...``."""
    return " | ".join(["ebft reward", *_render_fields(metrics, _REWARD_FIELDS)])


def _finite_or_none(value: Any) -> float | None:
    """A metric as a JSON-safe float: NaN and +-inf become None (JSON has no literal for them)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """Recursively replace non-finite floats by None so that ``json.dumps`` emits strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _import_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "use_tensorboard: true needs the 'tensorboard' package; install it with pip install 'ebft[tensorboard]'"
        ) from exc
    return SummaryWriter


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "wandb_project is set but the 'wandb' package is not installed; install it with pip install 'ebft[wandb]'"
        ) from exc
    return wandb


class Listener(Protocol):
    """What a live view of a run takes from its ``MetricsLogger``."""

    def metrics(self, step: int, values: dict[str, float | None]) -> None:
        """A recorded step or evaluation, as written to metrics.jsonl (NaN kept)."""
        ...

    def samples(self, step: int, previews: list) -> None:
        """Some of a step's samples (``ebft.train.runner.Preview``)."""
        ...


class MetricsLogger:
    """Sends each logged step to metrics.jsonl, the console and the configured trackers.

    ``output_dir/metrics.jsonl`` gets one object per ``log`` call, ``{"step": ..., **metrics}``,
    opened in append mode so a resumed run continues the same file. TensorBoard events go to
    ``output_dir/tensorboard``. On a non-main process (``is_main=False``) nothing is created,
    printed or imported. Pass the progress bar's console (``Progress.console``) so that lines
    printed while the bar is live land above it; the default is rich's global console, which is
    also what a ``Progress`` uses by default.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        use_tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        wandb_name: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        is_main: bool = True,
        console: Console | None = None,
        reward_line: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.reward_line = reward_line
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        self._console = console
        self._listeners: list[Listener] = []
        if not is_main:
            return
        # Resolve the optional packages first: a missing extra is a config error and should
        # surface before anything is written to disk.
        summary_writer = _import_summary_writer() if use_tensorboard else None
        wandb = _import_wandb() if wandb_project is not None else None
        if self._console is None:
            self._console = rich.get_console()

        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Held open for the logger's lifetime and closed in close(); a with-block cannot span calls.
        self._file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            if summary_writer is not None:
                self._tensorboard = summary_writer(log_dir=str(self.output_dir / "tensorboard"))
                if config_dict is not None:
                    dumped = json.dumps(_jsonable(dict(config_dict)), indent=2, default=str)
                    # Indented by four spaces: TensorBoard renders text as markdown, this keeps
                    # the JSON as a code block.
                    self._tensorboard.add_text("config", "    " + dumped.replace("\n", "\n    "))
            if wandb is not None:
                self._wandb_run = wandb.init(
                    project=wandb_project,
                    entity=wandb_entity,
                    name=wandb_name,
                    config=dict(config_dict) if config_dict is not None else None,
                )
        except BaseException:
            self.close()
            raise

    @property
    def console(self) -> Console | None:
        """The console lines are printed to (None on non-main processes)."""
        return self._console

    def add_listener(self, listener: Listener) -> None:
        """Also hand every recorded step (``log`` and ``log_eval``) and the samples of ``show_samples`` to
        ``listener``, e.g. a dashboard, after the file and the trackers have them."""
        self._listeners.append(listener)

    @property
    def listening(self) -> bool:
        """Whether anyone listens for samples (so that they are worth preparing)."""
        return bool(self._listeners)

    def show_samples(self, step: int, previews: list) -> None:
        """A step's samples (``Runner.previews``), for the listeners."""
        for listener in self._listeners:
            listener.samples(step, previews)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step. Values must convert with ``float()`` (python numbers, 0-d tensors)."""
        values = self._record(step, metrics)
        if values is None or self._console is None:  # both exist only on the main process
            return
        # soft_wrap: one metrics line stays one line whatever the terminal width, so logs grep.
        if self.reward_line:  # structured mode's own line (axolotl's format), then the step line
            self._console.print(format_reward_line(values), markup=False, highlight=False, soft_wrap=True)
        self._console.print(format_console_line(step, values), markup=False, highlight=False, soft_wrap=True)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one evaluation during training (``eval/`` metrics): its own line in metrics.jsonl (at the
        step it followed, 0 before the first) and in the trackers, and its own console line."""
        values = self._record(step, metrics)
        if values is not None and self._console is not None:  # both only on the main process
            self._console.print(format_eval_line(step, values), markup=False, highlight=False, soft_wrap=True)

    def _record(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None] | None:
        """metrics.jsonl, the trackers and the listeners; the values as floats (None on other processes)."""
        if not self.is_main:
            return None
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        values = {key: (None if value is None else float(value)) for key, value in metrics.items()}
        record = {"step": int(step), **{key: _finite_or_none(value) for key, value in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

        # Trackers keep NaN/inf: both plot them, and a NaN loss is exactly what one wants to see.
        tracked = {key: value for key, value in values.items() if value is not None}
        if self._tensorboard is not None:
            for key, value in tracked.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(tracked, step=step)
        for listener in self._listeners:
            listener.metrics(step, values)
        return values

    def close(self) -> None:
        """Flush and close the file and trackers. Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RolloutLog:
    """Append-only JSON-lines file of rollout records (prompt, sample, rewards, ...).

    The caller decides whether this process logs (main only). Non-finite floats are written as
    null so every line is strict JSON. With ``decode`` (token ids -> text, e.g. ``tokenizer.decode``) every
    list of token ids in a record (``tokens``, ``input_ids``) gets its text next to it (``text``,
    ``input_text``), so the file reads without the tokenizer.
    """

    def __init__(self, path: str | Path, decode: Callable[[list[int]], str] | None = None) -> None:
        self.path = Path(path)
        self.decode = decode

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write one compact JSON object per record and flush them to disk."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.decode is not None:
            records = [with_text(record, self.decode) for record in records]
        lines = [
            json.dumps(_jsonable(record), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            for record in records
        ]
        # Opened per call: the file is always complete on disk between steps and no handle
        # outlives the run, at the cost of one open() per logged step.
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


# Token-id fields of rollout records -> the field their decoded text goes in.
TEXT_FIELDS = {"tokens": "text", "input_ids": "input_text"}


def with_text(record: Any, decode: Callable[[list[int]], str]) -> Any:
    """``record`` with the decoded text of each token-id field (``TEXT_FIELDS``) beside it, at any depth."""
    if isinstance(record, Mapping):
        out = {key: with_text(value, decode) for key, value in record.items()}
        for ids, text in TEXT_FIELDS.items():
            if isinstance(record.get(ids), list) and text not in record:
                out[text] = decode(record[ids])
        return out
    if isinstance(record, list):
        return [with_text(value, decode) for value in record]
    return record


class _Task:
    """One bar of a ``Progress``: what ``Progress.task`` yields."""

    def __init__(self, bar: rich.progress.Progress, task: rich.progress.TaskID) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int = 1) -> None:
        self._bar.update(self._task, advance=n)


class Progress:
    """Training progress bar: bar, ``done/total`` steps, elapsed < remaining, and a short postfix.

    Output is suppressed entirely when ``is_main`` is False or ``disable`` is True. On a
    non-interactive console (CI logs, redirected output) rich does not redraw the bar; it
    prints its final state once when the bar stops. Print other lines through ``.console`` so
    they appear above the live bar instead of tearing it. ``live=False``: the bar never draws itself;
    a dashboard draws ``renderable``.
    """

    def __init__(
        self,
        total: int | None,
        *,
        description: str = "train",
        completed: int = 0,
        is_main: bool = True,
        disable: bool = False,
        console: Console | None = None,
        live: bool = True,
    ) -> None:
        self._live = live
        self._bar = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}"),
            rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(),
            rich.progress.TimeElapsedColumn(),
            rich.progress.TextColumn("<"),
            rich.progress.TimeRemainingColumn(),
            rich.progress.TextColumn("{task.fields[postfix]}"),
            console=console,
            disable=disable or not is_main,
        )
        self._task = self._bar.add_task(description, total=total, completed=completed, postfix="")

    @property
    def console(self) -> Console:
        """The console the bar draws on; print through it while the bar is live."""
        return self._bar.console

    def start(self) -> None:
        if self._live:
            self._bar.start()

    def stop(self) -> None:
        if self._live:
            self._bar.stop()

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        """Move the bar ``n`` steps; a given ``postfix`` replaces the text shown after it."""
        if postfix is None:
            self._bar.update(self._task, advance=n)
        else:
            self._bar.update(self._task, advance=n, postfix=postfix)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[_Task]:
        """A second bar under the main one while the block runs (e.g. an evaluation); ``.advance(n)`` moves it."""
        task = self._bar.add_task(description, total=total, postfix="")
        try:
            yield _Task(self._bar, task)
        finally:
            self._bar.remove_task(task)

    @property
    def renderable(self) -> rich.progress.Progress:
        """The bars, for a display that draws them itself (``live=False``)."""
        return self._bar

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process so far: CUDA allocator peak on a CUDA device, else peak RSS."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows has no resource module; report unknown rather than fail a run
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS but in KiB on Linux and the BSDs.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
