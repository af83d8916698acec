"""Mutation testing of the math modules with mutmut 3; not part of the normal test run (tests/MUTATION.md).

    python tests/mutation/run.py                    # run every selected mutant, then print the score
    python tests/mutation/run.py --max-children 2   # more parallel workers (default 1: a shared machine)
    python tests/mutation/run.py --score            # only print the score of the last run
    python tests/mutation/run.py 'ebft.rewards.*'   # rerun some mutants (names or globs), then the score
    python tests/mutation/run.py --resume           # run only the selected mutants with no result yet

mutmut reads its settings from pyproject.toml ([tool.mutmut]: which files, which tests) and works in
mutants/ at the repository root. This script runs it there with one thread per process and no PYTHONPATH
(so the mutated copy is what the tests import), restricted to SELECTED. The score is
killed / (selected - listed), where the listed mutants are those tests/MUTATION.md names, with the reason, as
lines "- `<mutant name>`: <reason>" under its "Equivalent" heading (no behaviour changes) or its "CPU" heading
(device placement that only a CUDA run can tell apart; also reported as survivors in a second score).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "tests" / "MUTATION.md"

# Every function of these modules.
WHOLE_MODULES = (
    "ebft.features",
    "ebft.rewards",
    "ebft.losses",
    "ebft.strided.anchors",
    "ebft.attention.strided_layout",
    "ebft.strided.step",
    "ebft.structured.scoring",
)
# The rest of structured mode's scoring and loss: functions of step.py (which also rolls out), sample.py
# and forward.py, selected by name in any module of ebft.structured so the selection survives moving them.
STRUCTURED_FUNCTIONS = (
    "right_padded",
    "loss_views",
    "loss_token_count",
    "predicting_states",
    "policy_logprobs",
    "ce_sequences",
    "old_logprobs",
    "microbatch",
    "_policy_gradient_term",
    "_importance_weights",
    "_ce_term",
    "_untempered",
)
SELECTED = tuple(f"{m}.*" for m in WHOLE_MODULES) + tuple(
    f"ebft.structured.*.x_{name}__mutmut_*" for name in STRUCTURED_FUNCTIONS
)

# mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into the classes the score needs. A timeout
# is CPU time beyond 30x the clean run's: the mutant was caught (usually an endless loop).
KILLED = {1, 3, 24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def selected(name: str, patterns: tuple[str, ...] = SELECTED) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def listed_mutants(report: Path = REPORT) -> tuple[dict[str, str], dict[str, str]]:
    """(equivalent, unobservable on CPU): mutant name -> reason, from the "- `name`: reason" lines under the
    report's "## Equivalent ..." and "## ... CPU ..." headings."""
    equivalent: dict[str, str] = {}
    cpu_only: dict[str, str] = {}
    if not report.exists():
        return equivalent, cpu_only
    target = None
    for line in report.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            target = cpu_only if "CPU" in line else equivalent if "quivalent" in line else None
        elif target is not None and (m := re.match(r"- `([\w.ǁ]+__mutmut_\d+)`: (.+)$", line)):
            target[m.group(1)] = m.group(2)
    return equivalent, cpu_only


def results(root: Path = ROOT) -> dict[str, int | None]:
    """Exit code of every selected mutant (None: not run yet), from mutmut's per-file .meta records."""
    out: dict[str, int | None] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text(encoding="utf-8"))
        out.update((k, v) for k, v in data["exit_code_by_key"].items() if selected(k))
    return out


def classify(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "suspicious"


def score(
    codes: dict[str, int | None], equivalent: dict[str, str], cpu_only: dict[str, str]
) -> tuple[str, int, list[str]]:
    """(summary text, exit status, names of the judged mutants that were not killed).

    Judged: every selected mutant except the equivalent ones and those only a CUDA run can tell apart."""
    listed = {**equivalent, **cpu_only}
    stale = sorted(set(listed) - set(codes))
    counts = Counter(classify(c) for name, c in codes.items() if name not in listed)
    judged = sum(counts.values())
    escaped = sorted(n for n, c in codes.items() if n not in listed and classify(c) not in ("killed", "not run"))
    cpu_killed = sum(classify(codes[n]) == "killed" for n in cpu_only if n in codes)
    with_cpu = judged + sum(n in codes for n in cpu_only)
    lines = [
        f"selected mutants: {len(codes)}; equivalent: {sum(n in codes for n in equivalent)}; "
        f"observable only on CUDA: {sum(n in codes for n in cpu_only)}",
        "judged: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"score: {counts['killed']} / {judged} = {100.0 * counts['killed'] / max(judged, 1):.1f}%",
        f"score counting the CUDA-only ones as survivors: {counts['killed'] + cpu_killed} / {with_cpu} = "
        f"{100.0 * (counts['killed'] + cpu_killed) / max(with_cpu, 1):.1f}%",
    ]
    if stale:
        lines.append("listed in tests/MUTATION.md but no longer generated: " + ", ".join(stale))
    return "\n".join(lines), (0 if not counts["not run"] else 1), escaped


def by_module(codes: dict[str, int | None], equivalent: dict[str, str], cpu_only: dict[str, str]) -> str:
    """One line per module: how many of its selected mutants are killed, survived, ..., or listed."""
    table: dict[str, Counter] = {}
    for name, code in codes.items():
        module = name.split(".x_")[0].split(".xǁ")[0]
        kind = "equivalent" if name in equivalent else "CUDA-only" if name in cpu_only else classify(code)
        table.setdefault(module, Counter())[kind] += 1
    return "\n".join(
        f"  {module}: {sum(c.values())} selected; " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        for module, c in sorted(table.items())
    )


def tiny_model(root: Path = ROOT) -> Path:
    """The tests' tiny model, built once for all mutants (conftest's EBFT_TEST_TINY_MODEL_DIR)."""
    out = root / "mutants" / "tiny-llama"
    done = out / "built"
    if not done.exists():
        sys.path.insert(0, str(root / "src"))
        sys.path.insert(0, str(root / "tests"))
        from conftest import build_tiny_model

        out.mkdir(parents=True, exist_ok=True)
        done.write_text(str(build_tiny_model(out)), encoding="utf-8")
    return Path(done.read_text(encoding="utf-8"))


def run_mutmut(names: list[str], max_children: int) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["EBFT_TEST_TINY_MODEL_DIR"] = str(tiny_model())
    mutmut = Path(sys.executable).with_name("mutmut")
    command = [str(mutmut), "run", "--max-children", str(max_children), *names]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutants", nargs="*", help="mutant names or globs to (re)run; default: every selected one")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutmut workers (default 1)")
    parser.add_argument("--score", action="store_true", help="only print the score of the last run")
    parser.add_argument("--resume", action="store_true", help="run only the selected mutants with no result yet")
    args = parser.parse_args(argv)
    # mutmut reruns every mutant it is given by name, so a resumed run names only those without a result.
    names = list(args.mutants) or SELECTED
    if args.resume:
        names = [n for n, code in results().items() if code is None]
    if not args.score and names:
        rc = run_mutmut(list(names), args.max_children)
        if rc != 0:
            print(f"mutmut exited with {rc}", file=sys.stderr)
            return rc
    codes, listed = results(), listed_mutants()
    text, status, escaped = score(codes, *listed)
    if escaped:
        print("not killed (see: mutmut show <name>):")
        print("\n".join(f"  {n}" for n in escaped))
    print("by module:")
    print(by_module(codes, *listed))
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
