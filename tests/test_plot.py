"""``ebft plot RUN_DIR``: metrics.jsonl -> one PNG per metric, and evaluations beside their training metric."""

from __future__ import annotations

import json
import sys

import pytest

from ebft.cli import main
from ebft.quickstart.plot import eval_pairs, file_name, metric_keys, read_metrics, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path):
    records = [
        {"step": 1, "ebft/alignment": 0.5, "loss": 1.0, "step_seconds": 2.0},
        {"step": 2, "ebft/alignment": None, "loss": 0.8, "step_seconds": 2.0},
        {"step": 3, "ebft/alignment": 0.7, "loss": 0.6, "step_seconds": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


def test_series_skips_missing_values(tmp_path):
    records = read_metrics(_run_dir(tmp_path) / "metrics.jsonl")
    assert series(records, "ebft/alignment") == ([1, 3], [0.5, 0.7])
    assert metric_keys(records) == ["ebft/alignment", "loss"]  # step_seconds is bookkeeping
    assert file_name("ebft/cfm_loss") == "ebft_cfm_loss.png"


def test_plot_cli_writes_pngs(tmp_path):
    run = _run_dir(tmp_path)
    assert main(["plot", str(run)]) == 0
    written = sorted(p.name for p in (run / "plots").iterdir())
    assert written == ["ebft_alignment.png", "loss.png"]
    assert (run / "plots" / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_missing_matplotlib_gives_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["plot", str(_run_dir(tmp_path))]) == 2
    assert "pip install 'ebft[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "null"])
def test_non_finite_values_are_skipped(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": {bad}}}\n{{"step": 2, "loss": 1.0}}\n')
    assert series(read_metrics(tmp_path / "metrics.jsonl"), "loss") == ([2], [1.0])


def test_evaluations_are_plotted_beside_their_training_metric(tmp_path):
    """Evaluation during training writes its own records (eval/ names, step 0 before the first step); each eval
    metric gets its figure, and each one a training metric measures the same way also gets one with both curves."""
    records = [
        {"step": 0, "eval/alignment": 0.40, "eval/cfm_loss": 0.9, "eval/answer_ce_loss": 5.0, "eval/seconds": 1.0},
        {"step": 1, "ebft/alignment": 0.45, "ebft/cfm_loss": 1.2, "ebft/ce_loss": 4.9, "loss": 1.0},
        {"step": 2, "ebft/alignment": 0.50, "ebft/cfm_loss": 1.1, "ebft/ce_loss": 4.8, "loss": 0.9},
        {"step": 2, "eval/alignment": 0.48, "eval/cfm_loss": 0.8, "eval/answer_ce_loss": 4.7, "eval/seconds": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    read = read_metrics(tmp_path / "metrics.jsonl")
    # The CFM pair is left out: evaluation reports the unbiased estimate, training the plug-in one.
    assert eval_pairs(read) == {
        "alignment": ("eval/alignment", "ebft/alignment"),
        "answer_ce_loss": ("eval/answer_ce_loss", "ebft/ce_loss"),
    }
    assert series(read, "eval/alignment") == ([0, 2], [0.40, 0.48])
    assert main(["plot", str(tmp_path)]) == 0
    written = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"eval_alignment.png", "eval_cfm_loss.png", "eval_vs_train_alignment.png"} <= written
    assert "eval_vs_train_answer_ce_loss.png" in written and "eval_seconds.png" not in written
    assert (tmp_path / "plots" / "eval_vs_train_alignment.png").read_bytes().startswith(PNG_MAGIC)
