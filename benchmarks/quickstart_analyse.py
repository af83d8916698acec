"""Tables and plots of the quickstart experiment from the ``result.json`` files of ``quickstart_sweep.py``.

    python benchmarks/quickstart_analyse.py --runs /tmp/ebft_sweep [--compare ARM_A:ARM_B ...] [--plot PNG]
        [--pairs A:B,C:D] [--heldout-plot PNG]

Prints, per arm: the seeds, training CPU minutes, the held-out metrics (mean over seeds, with the standard
error over seeds when there are several) and the generation measures. ``--compare A:B`` prints the
difference A - B of every metric two ways: per seed (the mean over documents of the paired per-document
differences, then the mean and standard error over seeds: is the effect reproducible across training
seeds?) and pooled (per-document differences of the seed-averaged models, standard error over documents:
do the two models differ on these documents?). ``--plot`` draws the training curves of EBFT's objective
(unbiased CFM of the training rollouts, 1 - mean(alignment - diversity / 2)) and of its reward, with bands of
+-2 standard errors over seeds (over a rolling window when there is one seed). ``--heldout-plot`` draws each
arm's held-out CFM and CE minus the base model's on the same corpus, paired by document, with +-2 standard
errors.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

METRICS = ("cfm_loss", "ce_loss", "alignment", "diversity", "reward")
GEN = ("parses", "finished", "distinct2", "repeated_lines")


def load(runs: Path) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for path in sorted(runs.glob("*/seed-*/result.json")):
        result = json.loads(path.read_text())
        arms.setdefault(result["name"], []).append(result)
    return arms


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]  # an arm without generation measures
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def doc_values(result: dict, key: str) -> dict[int, float]:
    return {d["index"]: d[key] for d in result["eval"]["documents"] if d.get(key) is not None}


def gen_values(result: dict, key: str) -> dict[int, float]:
    per_prompt = result.get("generation", {}).get("per_prompt", [])
    return {i: p[key] for i, p in enumerate(per_prompt)}


def values_of(result: dict, key: str) -> dict[int, float]:
    return gen_values(result, key) if key in GEN else doc_values(result, key)


def arm_mean(result: dict, key: str) -> float:
    values = list(values_of(result, key).values())
    if key in METRICS:  # token/block weighted overall metrics as evaluate reports them
        return result["eval"]["metrics"][key]
    return statistics.mean(values) if values else math.nan


def cpu_minutes(result: dict) -> float:
    return sum(v["cpu"] for k, v in result["seconds"].items() if k in ("sft", "ebft")) / 60


def fmt(mean: float, se: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def table(arms: dict[str, list[dict]]) -> None:
    keys = METRICS + GEN
    print("| arm | seeds | train CPU min | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for name, results in arms.items():
        seeds = ",".join(str(r["seed"]) for r in sorted(results, key=lambda r: r["seed"]))
        cells = [fmt(*mean_se([arm_mean(r, k) for r in results])) for k in keys]
        cpu = statistics.mean(cpu_minutes(r) for r in results)
        print(f"| {name} | {seeds} | {cpu:.1f} | " + " | ".join(cells) + " |")


def compare(arms: dict[str, list[dict]], a: str, b: str) -> None:
    """A - B, per seed and pooled over documents (see the module docstring)."""
    ra = {r["seed"]: r for r in arms[a]}
    rb = {r["seed"]: r for r in arms[b]}
    paired_seeds = sorted(set(ra) & set(rb))
    print(f"\n{a} - {b}: seeds paired {paired_seeds or 'none'}")
    print("| metric | per seed: mean ± se over seeds | pooled: mean ± se over documents / prompts | n |")
    print("|---|---|---|---|")
    for key in METRICS + GEN:
        per_seed = []
        for seed in paired_seeds:
            va, vb = values_of(ra[seed], key), values_of(rb[seed], key)
            common = sorted(set(va) & set(vb))
            if common:
                per_seed.append(statistics.mean(va[i] - vb[i] for i in common))
        pooled_a = _seed_average([values_of(r, key) for r in arms[a]])
        pooled_b = _seed_average([values_of(r, key) for r in arms[b]])
        common = sorted(set(pooled_a) & set(pooled_b))
        diffs = [pooled_a[i] - pooled_b[i] for i in common]
        print(f"| {key} | {fmt(*mean_se(per_seed))} | {fmt(*mean_se(diffs))} | {len(common)} |")


def _seed_average(per_seed: list[dict[int, float]]) -> dict[int, float]:
    per_seed = [v for v in per_seed if v]  # seeds whose run has no generation measures
    keys = set.intersection(*(set(v) for v in per_seed)) if per_seed else set()
    return {k: statistics.mean(v[k] for v in per_seed) for k in keys}


def training_series(result: dict, key: str) -> dict[int, float]:
    """step -> value of the EBFT part of a run: ``cfm`` is the unbiased CFM of that step's training rollouts,
    1 - (alignment - diversity / 2) (exact without whitening); other keys are read from the log."""
    out = {}
    for row in result["logs"].get("ebft", []):
        if "ebft/alignment" not in row:
            continue
        if key == "cfm":
            out[row["step"]] = 1 - (row["ebft/alignment"] - row["ebft/diversity"] / 2)
        else:
            out[row["step"]] = row[key]
    return out


PANELS = (
    ("cfm", "training CFM, unbiased (lower is better)"),
    ("ebft/mean_reward", "training reward (alignment - diversity)"),
)


def plot(arms: dict[str, list[dict]], names: list[str], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(12, 4))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for name in names:
            curves = [training_series(r, key) for r in arms[name]]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            # Rolling mean over `window` steps of each seed, then mean and standard error over seeds (with one
            # seed, the standard error of the window's values).
            means, lows, highs = [], [], []
            for i in range(len(steps)):
                span = steps[max(0, i - window + 1) : i + 1]
                per_seed = [statistics.mean(c[s] for s in span) for c in curves]
                m, se = mean_se(per_seed) if len(curves) > 1 else mean_se([curves[0][s] for s in span])
                se = 0.0 if math.isnan(se) else se
                means.append(m)
                lows.append(m - 2 * se)
                highs.append(m + 2 * se)
            label = f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
            line = ax.plot(steps, means, label=label)[0]
            ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}, rolling mean of {window}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("EBFT on its own training rollouts (bands: ±2 standard errors)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def paired_difference(arms: dict[str, list[dict]], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean and standard error over documents of A - B, each arm averaged over its seeds first."""
    pooled_a = _seed_average([values_of(r, key) for r in arms[a]])
    pooled_b = _seed_average([values_of(r, key) for r in arms[b]])
    return mean_se([pooled_a[i] - pooled_b[i] for i in sorted(set(pooled_a) & set(pooled_b))])


def pair_table(arms: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> None:
    """One row per pair A - B: each metric's pooled paired difference, bold beyond two standard errors."""
    keys = METRICS + ("parses", "finished")
    print("| A - B | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for a, b in pairs:
        cells = []
        for key in keys:
            mean, se = paired_difference(arms, a, b, key)
            cell = fmt(mean, se)
            cells.append(f"**{cell}**" if not math.isnan(se) and abs(mean) > 2 * se else cell)
        print(f"| {a} - {b} | " + " | ".join(cells) + " |")


def heldout_plot(arms: dict[str, list[dict]], path: Path) -> None:
    """Each arm's held-out CFM and CE minus the base model's on the same corpus (the ``--method base`` arm),
    document by document, with ±2 standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = {r[0].get("corpus", "code"): name for name, r in arms.items() if r[0]["method"] == "base"}
    rows = [(n, bases.get(r[0].get("corpus", "code"))) for n, r in arms.items() if n not in bases.values()]
    rows = [(n, b) for n, b in rows if b is not None]
    keys = (("cfm_loss", "held-out CFM loss"), ("ce_loss", "held-out cross-entropy"))
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 0.5 * len(rows) + 1.5))
    for ax, (key, title) in zip(axes, keys, strict=True):
        for y, (name, base) in enumerate(rows):
            mean, se = paired_difference(arms, name, base, key)
            ax.errorbar(mean, y, xerr=0.0 if math.isnan(se) else 2 * se, fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        labels = [f"{n} - {b} ({len(arms[n])} seed{'s' * (len(arms[n]) > 1)})" for n, b in rows]
        ax.set_yticks(range(len(rows)), labels)
        ax.set_title(f"{title} minus base (lower is better)", fontsize=9)
    fig.suptitle("Held-out documents, paired (bars: ±2 standard errors over documents)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("/tmp/ebft_sweep"))
    p.add_argument("--compare", action="append", default=[], help="ARM_A:ARM_B")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--plot-arms", default=None, help="comma-separated arms to plot (default: every EBFT arm)")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--pairs", default=None, help="A:B,C:D,...: one table of the paired differences of these pairs")
    p.add_argument("--heldout-plot", type=Path, default=None, help="PNG of each arm's held-out CFM and CE minus base")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        help="NAME=PATH: a training-only arm from an EBFT run's metrics.jsonl (plotted, not tabled)",
    )
    args = p.parse_args()
    arms = load(args.runs)
    extra = {}
    for item in args.metrics:
        name, _, path = item.partition("=")
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        extra[name] = [{"name": name, "seed": 0, "logs": {"ebft": rows}}]
    if arms:
        table(arms)
    for pair in args.compare:
        a, b = pair.split(":")
        compare(arms, a, b)
    if args.pairs:
        print()
        pair_table(arms, [tuple(pair.split(":")) for pair in args.pairs.split(",")])
    if args.heldout_plot:
        heldout_plot(arms, args.heldout_plot)
    if args.plot:
        ebft_arms = [name for name, results in arms.items() if results[0]["logs"].get("ebft")]
        names = args.plot_arms.split(",") if args.plot_arms else ebft_arms
        plot({**arms, **extra}, names + list(extra), args.plot, args.window)


if __name__ == "__main__":
    main()
