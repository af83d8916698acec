"""``ebft quickstart``: the corpus split, the plan, and a shortened run end to end."""

from __future__ import annotations

import html
import json
import subprocess
import sys

import pytest

from ebft.errors import EbftError
from ebft.quickstart.corpus import is_held_out, stdlib_corpus
from ebft.quickstart.run import Plan, _prepare_out

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_held_out_split_is_by_file_and_deterministic():
    train, held_out = stdlib_corpus()
    train_paths, held_paths = {f.path for f in train}, {f.path for f in held_out}
    assert not train_paths & held_paths
    assert all(is_held_out(p) for p in held_paths) and not any(is_held_out(p) for p in train_paths)
    # About 10% of the files are held out (hash buckets 0-9 of 100).
    assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.15
    assert not any(p.startswith("encodings/") or "/test/" in f"/{p}" for p in train_paths | held_paths)
    assert [f.path for f in stdlib_corpus()[1]] == [f.path for f in held_out]


def test_plan_scales_with_minutes():
    short, default = Plan.for_minutes(1), Plan.for_minutes(10)
    assert default.pretrain_steps == 10 * short.pretrain_steps
    assert default.finetune_steps == 10 * short.finetune_steps
    assert default.save_every * 5 == default.finetune_steps  # five points per curve
    with pytest.raises(EbftError):
        Plan.for_minutes(0)


def test_refuses_a_foreign_output_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EbftError, match="not written by ebft quickstart"):
        _prepare_out(tmp_path)
    assert (tmp_path / "notes.txt").exists()
    # A previous quickstart's folder (it has the marker file) is cleared instead.
    (tmp_path / "quickstart.json").write_text("{}")
    _prepare_out(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_quickstart_end_to_end(tmp_path):
    # A fresh process, as a user runs it: the CLI can then configure OpenMP before torch loads.
    out = tmp_path / "qs"
    command = [sys.executable, "-m", "ebft", "quickstart", "--out", str(out), "--minutes", "0.3", "--model", "scratch"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wins on" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    steps = summary["finetune"]["steps"]
    # Both runs take the same steps: the plan's, or fewer when the budget cut them (and the report says so).
    planned = Plan.for_minutes(0.3).finetune_steps
    assert steps["sft"] == steps["ebft"] <= planned
    assert steps["ebft"] == planned or f"fine-tuning steps {planned} -> {steps['ebft']}" in summary["budget"]["cuts"]
    # Held-out files never reach training.
    train_paths = {json.loads(line)["path"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    assert not train_paths & set(summary["corpus"]["heldout_paths"])

    rows = {row["metric"]: row for row in summary["comparison"]}
    assert {"cfm_loss", "alignment", "diversity", "reward", "ce_loss", "perplexity"} <= set(rows)
    for row in rows.values():
        assert row["winner"] in {"SFT", "EBFT", "tie"}
        if row["winner"] != "tie":  # a win is a difference beyond twice its standard error, in the right direction
            assert abs(row["diff"]) > 2 * row["stderr"]
            ebft_better = (row["diff"] > 0) == (row["better"] == "higher")
            assert row["winner"] == ("EBFT" if ebft_better else "SFT")

    # Curves: the base model at step 0, then every checkpoint of each run; or, when the budget dropped them,
    # the cut says so.
    if "no held-out curves" in " ".join(summary["budget"]["cuts"]):
        assert summary["curves"] == {}
    else:
        for run in ("sft", "ebft"):
            assert [p["step"] for p in summary["curves"][run]][0] == 0
            assert summary["curves"][run][-1]["step"] == steps[run]

    report = (out / "report.html").read_text()
    assert "wins on" in report
    curves = ("heldout_cfm_loss", "heldout_alignment", "heldout_diversity", "heldout_ce_loss")
    for name in (*(curves if summary["curves"] else ()), "training_ebft"):
        png = out / summary["plots"][name]
        assert png.read_bytes().startswith(PNG_MAGIC)
        assert summary["plots"][name] in report
    for name in ("base", "sft", "ebft"):
        assert json.loads((out / "eval" / f"{name}.json").read_text())["data"]["documents"] > 0

    # The example block: one held-out document cut at one anchor, n samples of g tokens from each model.
    example = summary["example"]
    assert example["document"] == summary["evaluation"]["base"]["documents"][0]["index"]
    assert list(example["samples"]) == ["base", "sft", "ebft"]
    n = summary["finetune"]["ebft"]["n_samples_per_prompt"]
    assert all(len(samples) == n for samples in example["samples"].values())
    assert "An example block" in report and html.escape(example["real"]) in report


def test_interrupted_quickstart_says_to_run_it_again(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the EBFT phase: exit 130 and the way on is the quickstart itself (there is no
    `ebft train` config to resume). The training phases are replaced so that only the orchestration runs."""
    import types

    import ebft.quickstart.run
    from ebft.cli import main
    from ebft.errors import TrainingInterrupted

    def sft_done_ebft_interrupted(cfg, mode, **_):
        if not mode.needs_features:  # SFT (pretraining and the SFT arm) runs without the feature network
            return types.SimpleNamespace(steps=10**9)
        raise TrainingInterrupted("interrupted at step 1; Resume with: ebft train <config> ...")

    monkeypatch.setattr(ebft.quickstart.run, "train", sft_done_ebft_interrupted)
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--minutes", "0.1", "--model", "scratch"]) == 130
    err = capsys.readouterr().err
    assert f"run `ebft quickstart --out {out}` again" in err
    assert "ebft train" not in err
