"""What a run says, and only that: no third-party deprecation noise, the whitening
note once, rollouts that read without a tokenizer, a merge message that does not suggest the base changed,
and plots whose tick labels are the values. Each check failed on the code before this change."""

from __future__ import annotations

import json
import warnings

import matplotlib
import yaml
from conftest import stdlib_texts

from ebft.cli import main
from ebft.config.value_warnings import WHITENING_NOTE
from ebft.quickstart.plot import _draw, require_pyplot

matplotlib.use("Agg")


def test_a_lora_run_with_whitening_and_rollouts(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t[:1200]}) + "\n" for t in stdlib_texts(4)))
    out = tmp_path / "out"
    raw = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 16,
            "context_length": 8,
            "generate_max_len": 4,
            "use_whitening": True,
            "log_rollouts": True,
        },
        "datasets": [{"path": str(tmp_path / "docs.jsonl"), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "max_steps": 2,
        "adapter": "lora",
        "lora_target_linear": True,
        "gradient_checkpointing": True,
        "merge_lora": True,
        "output_dir": str(out),
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    # PEFT reads transformers' deprecated alias when it wraps the model; nothing of it reaches the user.
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    log = "".join(capsys.readouterr().err.split())  # the console wraps long lines, paths included
    # No silent phase: each slow one starts with a line saying what it does, in the order they run.
    starts = [
        f"loadingthetokenizerof{tiny_model_dir}",
        f"dataset'{tmp_path / 'docs.jsonl'}':4rowsread;transformingandtokenizing(ebft_pretrain.transform)",
        f"loadingthemodel{tiny_model_dir}",
    ]
    positions = [log.find(line) for line in starts]
    assert -1 not in positions and positions == sorted(positions), positions
    assert log.count("".join(WHITENING_NOTE.split())) == 1
    merged = f"merge-lora: wrote {out / 'merged'}, the adapter in {out} merged into a copy of {tiny_model_dir} "
    assert "".join((merged + "(which is unchanged)").split()) in log
    # What the note says: whitened samples are orthonormal, so the diversity term is 0 and reward = alignment.
    for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert abs(line["ebft/diversity"]) < 1e-4
        assert abs(line["ebft/mean_reward"] - line["ebft/alignment"]) < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert records and all(r["input_text"] == tokenizer.decode(r["input_ids"]) for r in records)
    blocks = [block for r in records for sample in r["samples"] for block in sample]
    assert blocks and all(block["text"] == tokenizer.decode(block["tokens"]) for block in blocks)


def test_plot_tick_labels_are_the_values():
    plt = require_pyplot()
    fig, ax = plt.subplots()
    try:
        _draw(ax, {"loss": ([1000, 1001, 1002], [1388.0001, 1388.0003, 1388.0002])}, "t", "loss", "step")
        fig.canvas.draw()
        assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+1.388e3" above the axis
        assert ax.xaxis.get_major_formatter().get_offset() == ""
        assert any(label.get_text().startswith("1388.000") for label in ax.get_yticklabels())
    finally:
        plt.close(fig)
