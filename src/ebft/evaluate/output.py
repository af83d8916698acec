"""Output of an evaluation: the metric table (console, rich) and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ebft.evaluate.result import EvalResult

# Every reported metric: (key, label, which way is better) in table order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("cfm_loss", "feature-matching loss (CFM, unbiased)", "lower"),
    ("alignment", "alignment (2 cos to ground truth)", "higher"),
    ("alignment_best_of_n", "alignment, best of n", "higher"),
    ("diversity", "diversity (similarity between samples)", "lower"),
    ("reward", "reward (alignment - diversity)", "higher"),
    ("reward_best_of_n", "reward, best of n", "higher"),
    ("ce_loss", "cross-entropy, all tokens", "lower"),
    ("perplexity", "perplexity, all tokens", "lower"),
    ("answer_ce_loss", "cross-entropy, answer tokens", "lower"),
    ("answer_perplexity", "perplexity, answer tokens", "lower"),
)
# Rows shown only when the evaluation reports them: structured configs, and --execute.
STRUCTURED_METRICS: tuple[tuple[str, str, str], ...] = (
    ("completion_length", "completion length, tokens (mean)", "-"),
    ("truncated_fraction", "completions cut at their cap", "-"),
)
EXTRA_METRICS: tuple[tuple[str, str, str], ...] = (
    *STRUCTURED_METRICS,
    ("pass@1", "pass@1, unit tests", "higher"),
    ("pass@n", "pass@n, unit tests (n = num_generations)", "higher"),
    ("ground_truth_pass_rate", "ground truth passes its tests (check)", "1.0"),
)


def held_out_metrics(mode: str) -> dict[str, str]:
    """The metrics an evaluation of a ``mode`` config reports without ``--execute`` (those evaluation during
    training logs), each with the way it is better: ``lower``, ``higher`` or ``-`` (neither)."""
    rows = METRICS + (STRUCTURED_METRICS if mode == "structured" else ())
    return {key: better for key, _, better in rows}


def json_safe(value):
    """JSON has no inf/NaN: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result.to_json()), indent=2, allow_nan=False) + "\n")
    return path


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:+.4f}" if value < 0 else f"{value:.4f}"


def render_table(result: EvalResult, console=None) -> None:
    """Print the metrics as a rich table, with the direction in which each one is better."""
    from rich import get_console
    from rich.table import Table

    model = result.info.get("model", {})
    data = result.info.get("data", {})
    title = model.get("checkpoint") or model.get("base_model", "")
    if "prompts" in data:
        caption = f"{data['prompts']} prompts, {data.get('completions', 0)} completions"
    else:
        caption = f"{data.get('documents', 0)} documents, {data.get('blocks', 0)} blocks"
    caption += f", {data.get('tokens', 0)} tokens; {data.get('source', '')}"
    execution = result.info.get("execution")
    if execution is not None:
        caption += (
            f"\nunit tests of {execution['rows_with_tests']} rows: completions "
            f"{_status_counts(execution['completions'])}; ground truth {_status_counts(execution['ground_truth'])}"
        )
    table = Table(title=f"ebft evaluate: {title}", caption=caption)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better")
    for key, label, better in METRICS:
        table.add_row(label, format_value(result.metrics.get(key)), better)
    for key, label, better in EXTRA_METRICS:
        if key in result.metrics:
            table.add_row(label, format_value(result.metrics[key]), better)
    (console or get_console()).print(table)


def _status_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in counts.items())
