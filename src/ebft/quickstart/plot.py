"""PNG plots of metrics: ``ebft plot RUN_DIR`` and the quickstart's comparison figures.

matplotlib is an optional extra (``pip install 'ebft[plot]'``), imported only when a figure is drawn.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ebft.errors import EbftError

# Bookkeeping columns of metrics.jsonl that are not worth a figure.
SKIPPED_KEYS = frozenset({"step", "peak_memory_mib", "step_seconds", "ebft/skipped_steps", "eval/seconds"})
# An evaluation metric (``eval/`` + this) -> the training metrics defined the same way on the training batches,
# first present wins: ``ebft plot`` draws each pair in one more figure. (Not the CFM loss: evaluation reports the
# unbiased estimate, training the plug-in one, ||mean phi - phi_gt||^2, which is larger by the i = j terms.)
TRAINING_COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "alignment": ("ebft/alignment",),
    "diversity": ("ebft/diversity",),
    "reward": ("ebft/mean_reward", "ebft/reward"),
    "answer_ce_loss": ("ebft/ce_loss", "ce_loss"),  # both over the labelled (answer) tokens
}

Curve = tuple[Sequence[float], Sequence[float]]  # (steps, values)


def require_pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise EbftError("plotting needs matplotlib; install it with: pip install 'ebft[plot]'") from exc
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise EbftError(f"{path}: no such file (a training run writes metrics.jsonl into its output_dir)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EbftError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
    return records


def series(records: Sequence[Mapping], key: str) -> Curve:
    """(steps, values) of one metric, leaving out records where it is missing, null or not finite."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def metric_keys(records: Sequence[Mapping]) -> list[str]:
    """Numeric metrics present in the records, in first-seen order, without bookkeeping columns."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in SKIPPED_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.setdefault(key)
    return list(keys)


def file_name(key: str) -> str:
    """A metric name as a PNG file name: ``ebft/cfm_loss`` -> ``ebft_cfm_loss.png``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def _draw(ax, curves: Mapping[str, Curve], title: str, ylabel: str, xlabel: str) -> None:
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # Tick labels show the values themselves: an offset ("+1.388e3" above the axis) makes a metric that moves
    # in its third decimal unreadable.
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_curves(
    curves: Mapping[str, Curve], path: str | Path, *, title: str, ylabel: str, xlabel: str = "step"
) -> Path:
    """One figure with a line per labelled curve, saved to ``path``."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    try:
        _draw(ax, curves, title, ylabel, xlabel)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_panels(
    panels: Mapping[str, Mapping[str, Curve]], path: str | Path, *, columns: int = 2, xlabel: str = "step"
) -> Path:
    """One figure with a panel (own y axis) per title, each with a line per labelled curve."""
    plt = require_pyplot()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.2 * rows), dpi=110, squeeze=False)
    try:
        flat = axes.reshape(-1)
        for ax, (title, curves) in zip(flat, panels.items(), strict=False):
            _draw(ax, curves, title, "", xlabel)
        for ax in flat[len(panels) :]:
            ax.set_visible(False)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric of ``run_dir/metrics.jsonl`` in ``out_dir`` (default ``run_dir/plots``), and one per
    evaluation metric with a training counterpart (``eval_vs_train_<metric>.png``: both curves in one figure)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    keys = metric_keys(records)
    if not keys:
        raise EbftError(f"{run_dir / 'metrics.jsonl'}: no numeric metrics to plot")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    paths = []
    for key in keys:
        curve = series(records, key)
        if curve[0]:
            paths.append(plot_curves({key: curve}, out / file_name(key), title=f"{run_dir.name}: {key}", ylabel=key))
    for metric, (held_out, training) in eval_pairs(records).items():
        curves = {
            f"held-out ({held_out})": series(records, held_out),
            f"training ({training})": series(records, training),
        }
        path = out / file_name(f"eval_vs_train_{metric}")
        paths.append(plot_curves(curves, path, title=f"{run_dir.name}: {metric}, held-out and training", ylabel=metric))
    return paths


def eval_pairs(records: Sequence[Mapping]) -> dict[str, tuple[str, str]]:
    """metric -> (its evaluation name, its training name) for each evaluation metric of the records whose
    training counterpart (``TRAINING_COUNTERPARTS``) is logged too."""
    present = set(metric_keys(records))
    pairs = {}
    for metric, training in TRAINING_COUNTERPARTS.items():
        found = next((key for key in training if key in present), None)
        if f"eval/{metric}" in present and found is not None:
            pairs[metric] = (f"eval/{metric}", found)
    return pairs
