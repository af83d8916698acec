"""The quickstart's report: a verdict per metric, PNG figures, ``report.html`` and a console summary.

A verdict compares SFT and EBFT document by document on the same held-out documents
(``evaluate.metrics.compare_paired``): a method wins a metric only when its mean advantage exceeds twice
the standard error of the paired differences; otherwise the metric is a tie. The verdicts are stated
whatever they are.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ebft.evaluate.metrics import compare_paired
from ebft.evaluate.output import METRICS, format_value, json_safe
from ebft.quickstart.examples import render_html as render_example
from ebft.quickstart.plot import Curve, plot_curves, plot_panels, read_metrics, series

NAMES = {"base": "base", "sft": "SFT", "ebft": "EBFT"}
# Held-out curves drawn for both runs: (metric, title).
CURVES = (
    ("cfm_loss", "feature-matching loss (held-out, lower is better)"),
    ("alignment", "alignment (held-out, higher is better)"),
    ("diversity", "diversity (held-out, similarity between samples)"),
    ("ce_loss", "cross-entropy (held-out, lower is better)"),
)
# EBFT's own training metrics (on its training rollouts), after its objective (``training_objective``).
EBFT_TRAINING = (
    ("ebft/alignment", "alignment"),
    ("ebft/diversity", "diversity"),
    ("ebft/mean_reward", "reward (not the objective: see the text)"),
)

# How each embed_method turns a block's token features into one vector, in words.
POOLING_WORDS = {
    "last_token": "taken at each block's last token",
    "mean_pooling": "averaged over each block's tokens",
    "completion_mean": "averaged over each block's answer tokens",
    "concat": "taken at 1/4, 1/2 and 3/4 of each block and concatenated",
}

__all__ = ["compare", "json_safe", "print_summary", "render_html", "write_plots"]


def compare(finals: Mapping) -> list[dict]:
    """One row per metric: base/SFT/EBFT values and the SFT-vs-EBFT verdict.

    ``finals`` maps "base", "sft", "ebft" to ``EvalResult`` objects over the same documents. Answer-token
    metrics are left out when every token is an answer token (raw text), since they repeat the others.
    """
    sft, ebft, base = finals["sft"], finals["ebft"], finals["base"]
    data = sft.info.get("data", {})
    same_tokens = data.get("answer_tokens") == data.get("tokens")
    rows = []
    for key, label, better in METRICS:
        if same_tokens and key.startswith("answer_"):
            continue
        pairs = [
            (x[key], y[key])
            for x, y in zip(sft.documents, ebft.documents, strict=True)
            if x[key] is not None and y[key] is not None and math.isfinite(x[key]) and math.isfinite(y[key])
        ]
        row = {
            "metric": key,
            "label": label,
            "better": better,
            "base": base.metrics.get(key),
            "sft": sft.metrics.get(key),
            "ebft": ebft.metrics.get(key),
            "winner": "n/a",
            "diff": None,
            "stderr": None,
        }
        if pairs:
            result = compare_paired([p[0] for p in pairs], [p[1] for p in pairs], higher_is_better=better == "higher")
            row.update(
                winner={"a": "SFT", "b": "EBFT", "tie": "tie"}[result.winner], diff=result.diff, stderr=result.stderr
            )
        rows.append(row)
    return rows


def summary_sentences(summary: Mapping) -> list[str]:
    """The verdict, then what a longer experiment with the same settings found (when the settings have one)."""
    finding = summary["finetune"].get("finding")
    return verdict_sentences(summary["comparison"]) + ([finding] if finding else [])


def verdict_sentences(rows: Sequence[Mapping]) -> list[str]:
    """Plain statements: which metrics EBFT wins, which SFT wins, which are ties."""
    groups: dict[str, list[str]] = {"EBFT": [], "SFT": [], "tie": []}
    for row in rows:
        if row["winner"] in groups:
            groups[row["winner"]].append(row["label"])
    out = []
    for who in ("EBFT", "SFT"):
        if groups[who]:
            out.append(f"{who} wins on: {', '.join(groups[who])}.")
        else:
            out.append(f"{who} wins on no metric.")
    if groups["tie"]:
        out.append(f"No clear winner (difference within noise) on: {', '.join(groups['tie'])}.")
    return out


def time_sentences(summary: Mapping) -> list[str]:
    """The budget in words: planned and actual time, the measured slowdown, every cut, any overrun."""
    b = summary["budget"]
    seconds, floors = summary["seconds"], b["floors"]
    fixed = sum(b["fixed_seconds"].values()) + seconds.get("report", 0.0)
    spent = _fmt_seconds(b["spent_seconds"])
    out = [
        f"Time: --minutes {summary['minutes']:g} budgets {_fmt_seconds(b['seconds'])} for the planned phases "
        f"(sized for an idle machine, then re-planned from measured times); they took {spent}, plus "
        f"{_fmt_seconds(fixed)} of fixed costs (corpus, base model, report). This machine ran {b['slowdown']:.1f}x "
        f"slower than the plan's idle single-thread costs (first guess {b['slowdown_guess']:.1f}x)."
    ]
    if b["cuts"]:
        out.append("Cut to fit the budget: " + "; ".join(b["cuts"]) + ".")
    if b["spent_seconds"] > 1.1 * b["seconds"]:
        out.append(
            f"The planned phases overran the budget by {_fmt_seconds(b['spent_seconds'] - b['seconds'])}: "
            f"on this machine the budget does not fit the smallest plan ({floors['steps']} steps of each run, "
            f"{floors['heldout_docs']} held-out documents), or the machine slowed down after the plan was made."
        )
    return out


def training_objective(records: Sequence[Mapping], whitened: bool) -> tuple[str, Curve]:
    """(title, curve) of EBFT's objective on its training rollouts.

    Without whitening the features are unit vectors and the unbiased CFM estimate is 1 - (a - d / 2) from the
    logged alignment a and diversity d (``evaluate.metrics.cfm_unbiased``); the policy gradient is exactly
    its gradient. With whitening a and d are computed on whitened vectors, so only the logged plug-in CFM of
    those vectors is available."""
    if whitened:
        return "CFM of the whitened features (plug-in)", series(records, "ebft/cfm_loss")
    steps, align = series(records, "ebft/alignment")
    _, div = series(records, "ebft/diversity")
    cfm = [1 - (a - d / 2) for a, d in zip(align, div, strict=True)]
    return "EBFT's objective: CFM, unbiased (lower is better)", (steps, cfm)


def write_plots(out: Path, summary: Mapping, run_plots: Mapping[str, Sequence[Path]]) -> dict[str, str]:
    """Draw the report's figures into ``out/plots``; returns {name: path relative to out}."""

    plots_dir = out / "plots"
    made: dict[str, Path] = {}
    curves = summary["curves"]
    for key, title in CURVES if curves else ():
        lines = {
            NAMES[run]: (
                [p["step"] for p in points if p.get(key) is not None],
                [p[key] for p in points if p.get(key) is not None],
            )
            for run, points in curves.items()
        }
        made[f"heldout_{key}"] = plot_curves(lines, plots_dir / f"heldout_{key}.png", title=title, ylabel=key)

    sft_records = read_metrics(out / "sft" / "metrics.jsonl")
    ebft_records = read_metrics(out / "ebft" / "metrics.jsonl")
    train_ce = {"SFT": series(sft_records, "ce_loss")}
    if series(ebft_records, "ebft/ce_loss")[0]:
        train_ce["EBFT (its CE term)"] = series(ebft_records, "ebft/ce_loss")
    made["training_ce"] = plot_curves(
        train_ce, plots_dir / "training_ce.png", title="cross-entropy on training batches", ylabel="ce_loss"
    )
    title, objective = training_objective(ebft_records, summary["finetune"]["ebft"]["use_whitening"])
    panels = {f"EBFT training rollouts: {title}": {"EBFT": objective}}
    panels.update(
        {f"EBFT training rollouts: {label}": {"EBFT": series(ebft_records, key)} for key, label in EBFT_TRAINING}
    )
    made["training_ebft"] = plot_panels(panels, plots_dir / "training_ebft.png")
    if summary.get("pretrain"):
        made["pretrain_ce"] = plot_curves(
            {"pretraining": series(read_metrics(out / "base" / "metrics.jsonl"), "ce_loss")},
            plots_dir / "pretrain_ce.png",
            title="pretraining from scratch: cross-entropy",
            ylabel="ce_loss",
        )
    rel = {name: str(path.relative_to(out)) for name, path in made.items()}
    for run, paths in run_plots.items():
        for path in paths:
            rel[f"{run}:{path.stem}"] = str(Path(path).relative_to(out))
    return rel


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _table(rows: Sequence[Mapping]) -> str:
    columns = ("metric", "better", "base", "SFT", "EBFT", "winner", "EBFT - SFT")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    body = []
    for row in rows:
        diff = "" if row["diff"] is None else f"{row['diff']:+.4f} &plusmn; {2 * row['stderr']:.4f}"
        cls = {"EBFT": "ebft", "SFT": "sft"}.get(row["winner"], "tie")
        body.append(
            f"<tr><td>{html.escape(row['label'])}</td><td>{row['better']}</td>"
            f"<td>{format_value(row['base'])}</td><td>{format_value(row['sft'])}</td>"
            f"<td>{format_value(row['ebft'])}</td><td class='{cls}'>{row['winner']}</td><td>{diff}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
td { text-align: right; } td:first-child { text-align: left; } th { background: #f4f4f4; }
td.ebft { background: #dff0d8; } td.sft { background: #d9edf7; } td.tie { color: #777; }
p.note { background: #fcf8e3; padding: 6px; }
img { max-width: 48%; margin: 0.5%; border: 1px solid #eee; } code { background: #f4f4f4; padding: 0 3px; }
"""


def render_html(summary: Mapping) -> str:
    """The whole report as one HTML page (figures referenced by relative path)."""
    rows = summary["comparison"]
    model, corpus = summary["model"], summary["corpus"]
    ft = summary["finetune"]
    files = f"{corpus['train_files']} files"
    if corpus["train_files"] < corpus["train_files_available"]:
        files += f" (a slice sized to the time budget, out of {corpus['train_files_available']} training files)"
    ev = summary["evaluation"]["base"]
    seconds = summary["seconds"]
    plots = summary["plots"]
    verdicts = "".join(f"<li>{html.escape(s)}</li>" for s in summary_sentences(summary))
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in time_sentences(summary))
    cpu_total = summary.get("cpu_seconds", {}).get("total")
    # CPU time is what the run costs on an idle machine whatever else was running; wall time is not.
    cpu = f"; CPU time of this process {_fmt_seconds(cpu_total)}" if cpu_total is not None else ""
    timing = ", ".join(f"{html.escape(k)} {_fmt_seconds(v)}" for k, v in seconds.items() if k != "total")
    probe_docs = summary["budget"]["final"]["probe_docs"]
    if summary["curves"]:
        heldout = (
            f"<p>Each point evaluates a saved checkpoint on {probe_docs} held-out documents (step 0 is the base "
            "model), with the same rollouts settings as the table.</p>"
            + "".join(f"<img src='{plots[f'heldout_{key}']}' alt='{key}'>" for key, _ in CURVES)
        )
    else:
        heldout = "<p>None: the time budget left no time to evaluate the saved checkpoints (see the time note).</p>"
    training_imgs = "".join(
        f"<img src='{plots[name]}' alt='{name}'>"
        for name in ("training_ebft", "training_ce", "pretrain_ce")
        if name in plots
    )
    run_links = " ".join(f"<a href='{path}'>{html.escape(name)}</a>" for name, path in plots.items() if ":" in name)
    ebft_settings = ", ".join(f"{k}={v}" for k, v in ft["ebft"].items())
    settings = ft["ebft"]
    n, g = settings["n_samples_per_prompt"], settings["generate_max_len"]
    pooling = POOLING_WORDS.get(settings["embed_method"], settings["embed_method"])
    layers = "/".join(f"{100 * f:g}%" for f in settings["feature_layers"])
    docs = ft["documents_per_step"]
    pretrain_words = ", and the pretraining loss" if summary.get("pretrain") else ""
    pretrain_link = ', <a href="configs/pretrain.yaml">configs/pretrain.yaml</a>' if summary.get("pretrain") else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ebft quickstart report</title><style>{_CSS}</style></head><body>
<h1>EBFT vs SFT on Python source code</h1>
<p>{_base_sentence(summary, files)} From that base model, SFT and strided EBFT each ran
{ft["steps"]["sft"]} / {ft["steps"]["ebft"]} optimizer steps on the same training documents in the same order
({ft["documents_per_step"]} documents of {model["sequence_len"]} tokens per step,
learning rate {ft["learning_rate"]:g}, {ft["lr_scheduler"]}). All three models were evaluated on
{ev["data"]["documents"]} documents ({ev["data"]["blocks"]} blocks, {ev["data"]["tokens"]} tokens) drawn from
{corpus["heldout_files"]} held-out files that no model saw in training. Total time {_fmt_seconds(seconds["total"])}
({timing}){cpu}.</p>
{notes}
<h2>Verdict</h2>
<ul>{verdicts}</ul>
{_table(rows)}
{render_example(summary.get("example") or {}, NAMES)}
<p>"winner" compares SFT and EBFT on the same held-out documents: a method wins a metric when its mean
advantage over the other is more than twice the standard error of the per-document differences (the last
column shows the difference and that margin); otherwise it is a tie. The base column is the starting point
of both runs.</p>

<h2>Held-out metrics during fine-tuning</h2>
{heldout}

<h2>Training curves</h2>
{training_imgs}
<p>EBFT's metrics on its own training rollouts (each point averages a few steps of {docs} documents, each seen for
the first time, so they are noisy), the cross-entropy of the training batches (SFT's loss, and the CE term of
EBFT's objective){pretrain_words}. The curve to watch is EBFT's objective, the feature-matching loss: its policy
gradient is the reward's, but the reward's value is not the objective. It is a game between samples (each is
rewarded for being unlike the others), and its expectation is 1 - CFM - |E phi|^2, which falls when the samples
grow alike even while the CFM falls.
Per-metric plots of each run (<code>ebft plot RUN_DIR</code>): {run_links}</p>

<h2>How to read this</h2>
<ul>
<li><b>Feature-matching loss (CFM)</b>: how far the mean feature vector of the model's {n} sampled continuations is
from the feature vector of the real continuation, per {g}-token block. Features are the frozen base model's hidden
states at {layers} of its depth, {pooling}, normalised to unit length. The loss is estimated without bias from
the samples (pairs of distinct samples only), so it can be slightly negative. This is what EBFT optimises. Lower is
better.</li>
<li><b>Alignment</b>: 2 x cosine similarity between a sample's features and the real continuation's. Higher is
better. <b>Best of n</b> takes the best of the {n} samples per block (an oracle pick).</li>
<li><b>Diversity</b>: 2 x the mean dot product between different samples' features; lower means the samples differ
more from each other. Judged alone it rewards noise; it matters together with alignment (reward = alignment -
diversity, and CFM = 1 - mean(alignment - diversity / 2)).</li>
<li><b>Cross-entropy / perplexity</b>: teacher-forced next-token loss of the real held-out text, what SFT
optimises. Lower is better.</li>
<li>Rollouts use temperature {ft["ebft"]["temperature"]} and are seeded per document, so every model is evaluated
on the same documents with the same random streams.</li>
</ul>

<h2>Settings</h2>
<p>EBFT: {html.escape(ebft_settings)}. {html.escape(ft.get("rationale", ""))}
Configs: <a href="configs/finetune.yaml">configs/finetune.yaml</a>
(both runs), <a href="configs/evaluate.yaml">configs/evaluate.yaml</a>{pretrain_link}.
Numbers: <a href="summary.json">summary.json</a>, <a href="eval/base.json">eval/base.json</a>,
<a href="eval/sft.json">eval/sft.json</a>, <a href="eval/ebft.json">eval/ebft.json</a>.
Re-evaluate a model: <code>ebft evaluate configs/evaluate.yaml --checkpoint ebft --split train</code>.</p>
</body></html>
"""


def _base_sentence(summary: Mapping, files: str) -> str:
    """Where the base model came from: a pretrained checkpoint, or trained from scratch on ``files``."""
    model, corpus = summary["model"], summary["corpus"]
    shape = (
        f"{model['parameters'] / 1e6:.1f}M-parameter model ({model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, vocabulary {model['vocab_size']})"
    )
    root = html.escape(str(corpus["root"]))
    if model.get("pretrained"):
        ft = summary["finetune"]
        adapter = f"a rank-{ft['lora_r']} LoRA adapter" if ft.get("adapter") else "all weights"
        return (
            f"The base model is {html.escape(model['origin'])}: a pretrained {shape}, fine-tuned ({adapter}) on "
            f"{files} of this Python's standard library ({root})."
        )
    return (
        f"A {shape} was trained from scratch on {files} of this Python's standard library ({root}) for "
        f"{summary['pretrain']['steps']} steps. Why from scratch: {html.escape(model['origin'])}."
    )


def print_summary(summary: Mapping, console=None) -> None:
    """The verdict table and sentences on the console."""
    from rich import get_console
    from rich.table import Table

    console = console or get_console()
    table = Table(title="ebft quickstart: held-out evaluation")
    for column in ("metric", "better", "base", "SFT", "EBFT", "winner"):
        table.add_column(column, justify="left" if column in ("metric", "better", "winner") else "right")
    for row in summary["comparison"]:
        table.add_row(
            row["label"],
            row["better"],
            format_value(row["base"]),
            format_value(row["sft"]),
            format_value(row["ebft"]),
            row["winner"],
        )
    console.print(table)
    for sentence in summary_sentences(summary) + time_sentences(summary):
        console.print(sentence, markup=False, highlight=False)
