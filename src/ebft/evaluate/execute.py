"""``--execute``: run each completion's code, and the ground truth's, against a code row's unit tests in
the sandbox (``evaluate.sandbox``), and turn the outcomes into pass@1 / pass@n (``metrics.pass_at_k``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ebft.evaluate import metrics as eval_metrics
from ebft.evaluate.sandbox import run_code

# Default wall-clock seconds for one completion's code and tests under --execute.
EXEC_TIMEOUT = 3.0


def extract_code(text: str) -> str:
    """The code to run from a completion: the first fenced block tagged python (or py, python3) or not
    tagged at all, else the whole text. A fence left open (a completion cut at its cap) runs to the end."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        if fence[3:].strip().lower() in ("", "python", "py", "python3"):
            return "\n".join(lines[i + 1 : end])
        i = end + 1  # another language's block: skip it whole, so its closing fence opens nothing
    return text


@dataclass(frozen=True)
class RowExecution:
    """Sandbox outcomes of one row's tests (``sandbox`` statuses: pass, fail, timeout, error).

    completions: one status per completion; ground_truth: the status of the row's reference answer.
    """

    completions: tuple[str, ...]
    ground_truth: str

    @property
    def passed(self) -> int:
        return self.completions.count("pass")

    def record(self) -> dict:
        n, c = len(self.completions), self.passed
        return {
            "passed": c,
            "pass@1": eval_metrics.pass_at_k(n, c, 1),
            "pass@n": eval_metrics.pass_at_k(n, c, n),
            "ground_truth_passed": self.ground_truth == "pass",
        }


def run_row_tests(
    completions: Sequence[str], ground_truth: str, tests: Sequence[str], *, timeout: float = EXEC_TIMEOUT
) -> RowExecution:
    """Run the code of every completion, and of the ground truth, followed by ``tests`` in the sandbox.

    The code is ``extract_code`` of the text; for a multi-turn row that text is the whole rolled-out rest
    of the conversation, so its first python block is what runs.
    """

    def status(text: str) -> str:
        return run_code(extract_code(text), tests, timeout=timeout).status

    return RowExecution(tuple(status(text) for text in completions), status(ground_truth))


def execution_metrics(results: Sequence[RowExecution]) -> tuple[dict[str, float], dict]:
    """(metrics, counts) over the rows that have tests.

    metrics: ``pass@1`` and ``pass@n`` (unbiased estimator, n = the completions of a row, the same
    for every row) and ``ground_truth_pass_rate``. counts: rows, and how many completions and ground
    truths ended in each status.
    """
    if not results:
        raise ValueError("no rows with tests")
    pairs = [(len(r.completions), r.passed) for r in results]
    n = len(results[0].completions)
    metrics = {
        "pass@1": eval_metrics.mean_pass_at_k(pairs, 1),
        "pass@n": eval_metrics.mean_pass_at_k(pairs, n),
        "ground_truth_pass_rate": sum(r.ground_truth == "pass" for r in results) / len(results),
    }
    statuses = ("pass", "fail", "timeout", "error")
    completions = Counter(status for r in results for status in r.completions)
    truths = Counter(r.ground_truth for r in results)
    counts = {
        "rows_with_tests": len(results),
        "completions": {k: completions[k] for k in statuses},
        "ground_truth": {k: truths[k] for k in statuses},
    }
    return metrics, counts
