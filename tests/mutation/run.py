"""Mutation testing of the math modules with mutmut 3; not part of the normal test run (tests/MUTATION.md).

    python tests/mutation/run.py                    # run every selected mutant, then print the score
    python tests/mutation/run.py --max-children 2   # more parallel workers (default 1: a shared machine)
    python tests/mutation/run.py --score            # only print the score of the last run
    python tests/mutation/run.py 'ebft.rewards.*'   # rerun some mutants (names or globs), then the score
    python tests/mutation/run.py --resume           # run only the selected mutants with no result yet

mutmut reads its settings from pyproject.toml ([tool.mutmut]: which files, which tests) and works in
mutants/ at the repository root. This script runs it there with one thread per process and no PYTHONPATH
(so the mutated copy is what the tests import), restricted to SELECTED. The score is
killed / (selected - equivalent), where the equivalent mutants are the ones listed, with their reason, in
tests/MUTATION.md as lines "- `<mutant name>`: <reason>".
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
    "ebft.strided.layout",
    "ebft.strided.step",
)
# structured/step.py also holds the rollout and multi-turn bookkeeping; only its scoring and loss functions
# are selected, by name in any module of ebft.structured so the selection survives moving them.
STRUCTURED_FUNCTIONS = (
    "_right_padded",
    "embed",
    "embed_pairs",
    "score",
    "loss_views",
    "loss_token_count",
    "policy_logprobs",
    "ce_sequences",
    "old_logprobs",
    "microbatch",
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


def equivalent_mutants(report: Path = REPORT) -> dict[str, str]:
    """Mutant name -> reason, from the "- `name`: reason" lines of the report."""
    if not report.exists():
        return {}
    found = re.findall(r"^- `([\w.ǁ]+__mutmut_\d+)`: (.+)$", report.read_text(encoding="utf-8"), re.M)
    return dict(found)


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


def score(codes: dict[str, int | None], equivalent: dict[str, str]) -> tuple[str, int, list[str]]:
    """(summary text, exit status, names of the non-equivalent mutants that were not killed)."""
    stale = sorted(set(equivalent) - set(codes))
    counts = Counter(classify(c) for name, c in codes.items() if name not in equivalent)
    eq = Counter(classify(codes[name]) for name in equivalent if name in codes)
    judged = sum(counts.values())
    escaped = sorted(n for n, c in codes.items() if n not in equivalent and classify(c) not in ("killed", "not run"))
    lines = [
        f"selected mutants: {len(codes)}; listed as equivalent: {sum(eq.values())} "
        f"({eq['killed']} of them killed anyway)",
        "non-equivalent: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"score: {counts['killed']} / {judged} = {100.0 * counts['killed'] / max(judged, 1):.1f}%",
    ]
    if stale:
        lines.append("listed as equivalent but no longer generated (update tests/MUTATION.md): " + ", ".join(stale))
    return "\n".join(lines), (0 if not counts["not run"] else 1), escaped


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
    text, status, escaped = score(results(), equivalent_mutants())
    if escaped:
        print("not killed (see: mutmut show <name>):")
        print("\n".join(f"  {n}" for n in escaped))
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
