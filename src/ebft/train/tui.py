"""``ebft train --tui``: a live terminal dashboard of the run (main process only).

What it shows: the run (model, mode, processes, output folder), the progress bars with the time left (the very
bars of the plain console, drawn here), the EBFT metrics as small curves over the logged history (reward, CFM,
alignment, diversity, loss, and the ``eval/`` metrics once there are some), the latest samples with their
rewards (structured: completions; strided: decoded rollouts, with ``ebft.log_rollouts``) and the log's last
lines. It is fed from the same place as the console and metrics.jsonl: it listens to the run's
``MetricsLogger`` (``ebft.train.reporting``).

Nothing is lost and nothing hidden: while it is open, every log record and everything written to stdout or
stderr goes to ``output_dir/train.log`` (and to the log panel); when it closes (at the end, or on an error,
before the error is printed as usual) the terminal gets back its screen and then the log's last lines and the
file's path. A terminal is needed: without one ``--tui`` falls back to the plain console with a warning
(``terminal_problem``).
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ebft.errors import EbftError
from ebft.train.reporting import Progress
from ebft.train.runner import Preview

LOG_FILE = "train.log"
BLOCKS = "▁▂▃▄▅▆▇█"
# Curves, in order: (label, the logged names to try, first present wins, in the training then eval history).
CURVES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("ebft/mean_reward", "ebft/reward")),
    ("cfm loss", ("ebft/cfm_loss",)),
    ("alignment", ("ebft/alignment",)),
    ("diversity", ("ebft/diversity",)),
    ("loss", ("loss",)),
    ("ce loss", ("ebft/ce_loss", "ce_loss")),
    ("eval cfm", ("eval/cfm_loss",)),
    ("eval reward", ("eval/reward",)),
    ("eval align", ("eval/alignment",)),
    ("eval ce", ("eval/ce_loss",)),
)
# Lines printed after the dashboard closes: the whole log when it is this short, else its last lines.
SHOWN_LINES = 60


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` finite values as block characters, scaled from their minimum (the lowest block) to
    their maximum (the highest); all equal: middle blocks. Non-finite values are left out."""
    points = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)][-width:]
    if not points:
        return ""
    low, high = min(points), max(points)
    if high == low:
        return BLOCKS[len(BLOCKS) // 2 - 1] * len(points)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[round((v - low) / (high - low) * top)] for v in points)


def terminal_problem(stream: IO[str]) -> str | None:
    """Why the dashboard cannot be drawn on ``stream`` (None: it can)."""
    if not stream.isatty():
        return "stdout is not a terminal"
    return None


@dataclass(frozen=True)
class RunInfo:
    """The dashboard's header."""

    model: str
    mode: str
    processes: int
    output_dir: str


class _Lines:
    """A text stream cut into lines, each written to the log file and kept in the log panel's tail; a carriage
    return (a progress bar redrawing itself) keeps only what follows it."""

    def __init__(self, file: IO[str], tail: deque[str]):
        self.file, self.tail, self.pending = file, tail, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].rstrip()
        self.file.write(line + "\n")
        self.file.flush()
        self.tail.append(line)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if self.pending.strip("\r"):
            self._line(self.pending)
        self.pending = ""

    def isatty(self) -> bool:
        return False


class _LineHandler(logging.Handler):
    """Log records as the console shows them (``LEVEL message``), into ``_Lines``."""

    def __init__(self, lines: _Lines):
        super().__init__()
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.write(self.format(record) + "\n")


@contextmanager
def _captured(lines: _Lines) -> Iterator[None]:
    """Inside the block everything that would reach the terminal goes to ``lines``: the ``ebft`` logger's records
    (its own handlers set aside), ``sys.stdout`` and ``sys.stderr``, and every other logging handler that writes
    to them (transformers and datasets keep the stream they were made with)."""
    ebft_log = logging.getLogger("ebft")
    own = list(ebft_log.handlers)
    handler = _LineHandler(lines)
    terminal = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    loggers = [
        logging.getLogger(),
        *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)),
    ]
    streams = [
        (h, h.stream)
        for logger in loggers
        for h in logger.handlers
        # A handler whose stream is a property (logging's last resort) already follows sys.stderr.
        if isinstance(h, logging.StreamHandler) and not isinstance(getattr(type(h), "stream", None), property)
        if id(h.stream) in terminal and logger is not ebft_log
    ]
    saved = sys.stdout, sys.stderr
    for h in own:
        ebft_log.removeHandler(h)
    ebft_log.addHandler(handler)
    for h, _ in streams:
        h.setStream(lines)
    sys.stdout = sys.stderr = lines
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for h, stream in streams:
            h.setStream(stream)
        ebft_log.removeHandler(handler)
        for h in own:
            ebft_log.addHandler(h)


class Dashboard:
    """The live dashboard; a context manager (see the module docstring). While it is open, print through
    ``console`` (it writes to the log file and the log panel) and hand it the run with ``attach``; it takes
    metrics and samples as a listener of the run's ``MetricsLogger``."""

    def __init__(self, output_dir: str | Path, *, terminal: IO[str] | None = None, refresh_per_second: float = 4):
        self.log_path = Path(output_dir) / LOG_FILE
        self.terminal = Console(file=terminal or sys.stdout)
        self.refresh_per_second = refresh_per_second
        self.tail: deque[str] = deque(maxlen=200)
        self.history: dict[str, list[float]] = {}
        self.samples_shown: deque[Preview] = deque(maxlen=8)
        self.info: RunInfo | None = None
        self.progress: Progress | None = None
        self.console: Console | None = None

    # -- feeds -----------------------------------------------------------------------------------

    def attach(self, info: RunInfo, progress: Progress) -> None:
        """The run being trained and its progress bars (a ``Progress(live=False)``)."""
        self.info, self.progress = info, progress

    def metrics(self, step: int, values: dict[str, float | None]) -> None:
        """A logged step or evaluation (``MetricsLogger`` listener)."""
        for key, value in values.items():
            if value is not None:
                self.history.setdefault(key, []).append(value)

    def samples(self, step: int, previews: list[Preview]) -> None:
        """A step's samples (``MetricsLogger`` listener)."""
        self.samples_shown.extend(previews)

    # -- open and close --------------------------------------------------------------------------

    def __enter__(self) -> Dashboard:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            file = stack.enter_context(open(self.log_path, "a", encoding="utf-8"))
            self._lines = _Lines(file, self.tail)
            stack.callback(self._lines.close)
            # rich only writes, flushes and asks isatty, which _Lines answers as a text stream does.
            self.console = Console(file=cast(IO[str], self._lines), width=160, soft_wrap=True, color_system=None)
            stack.enter_context(_captured(self._lines))
            self._live = Live(
                get_renderable=self._layout,
                console=self.terminal,
                screen=True,
                refresh_per_second=self.refresh_per_second,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            stack.enter_context(self._live)
            self._open = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open.close()  # the screen back, the streams and handlers restored, the log file complete
        self._print_log()
        if exc is not None:  # into the file too; the CLI (or Python) prints it once the screen is back
            user = isinstance(exc, EbftError)  # the CLI prints these as one line, the others with their traceback
            text = f"error: {exc}" if user else "".join(traceback.format_exception(exc_type, exc, tb))
            with open(self.log_path, "a", encoding="utf-8") as file:
                file.write(text.rstrip("\n") + "\n")

    def _print_log(self) -> None:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        shown = lines if len(lines) <= SHOWN_LINES else lines[-SHOWN_LINES:]
        head = "the whole log" if len(shown) == len(lines) else f"the last {len(shown)} of {len(lines)} lines"
        self.terminal.print(f"ebft train --tui: {head} of {self.log_path}:", markup=False, highlight=False)
        for line in shown:
            self.terminal.print(line, markup=False, highlight=False, soft_wrap=True)
        self.terminal.print(f"full log: {self.log_path}", markup=False, highlight=False)

    # -- drawing ---------------------------------------------------------------------------------

    def _layout(self) -> Layout:
        root = Layout()
        tail_height = max(6, self.terminal.size.height // 4)
        root.split_column(
            Layout(self._header(), size=3),
            Layout(self._progress(), size=5),
            Layout(name="body", ratio=1),
            Layout(self._log_panel(tail_height - 2), size=tail_height),
        )
        root["body"].split_row(Layout(self._curves(), ratio=2), Layout(self._samples_panel(), ratio=3))
        return root

    def _header(self) -> Panel:
        i = self.info
        text = (
            "starting: loading data and model"
            if i is None
            else (f"{i.model} | {i.mode} | {i.processes} process{'es' if i.processes > 1 else ''} | {i.output_dir}")
        )
        return Panel(Text(text, overflow="ellipsis", no_wrap=True), title="ebft train", title_align="left")

    def _progress(self) -> Panel:
        body = self.progress.renderable if self.progress is not None else Text("waiting for the first step")
        return Panel(body, title="progress", title_align="left")

    def _curves(self) -> Panel:
        table = Table.grid(padding=(0, 1))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        for label, keys in CURVES:
            key = next((k for k in keys if self.history.get(k)), None)
            if key is not None:
                values = self.history[key]
                table.add_row(label, sparkline(values, 32), f"{values[-1]:.4g}")
        body = table if table.row_count else Text("no logged step yet")
        return Panel(body, title="metrics", title_align="left")

    def _samples_panel(self) -> Panel:
        shown = list(self.samples_shown)
        if not shown:
            body: Any = Text("no samples yet (structured: trl.log_completions; strided: ebft.log_rollouts)")
        else:
            body = Group(*(_sample_line(p) for p in reversed(shown)))
        return Panel(body, title="latest samples", title_align="left")

    def _log_panel(self, height: int) -> Panel:
        lines = list(self.tail)[-max(height, 1) :]
        body = Text("\n".join(lines), overflow="ellipsis", no_wrap=True)
        return Panel(body, title=f"log ({self.log_path})", title_align="left")


def _sample_line(preview: Preview) -> Text:
    text = Text(f"{preview.reward:+.3f} ", style="bold")
    text.append(f"{preview.label}: ")
    text.append(preview.text.replace("\n", "\\n"))
    text.no_wrap, text.overflow = True, "ellipsis"
    return text
