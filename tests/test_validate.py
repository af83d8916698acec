"""``ebft validate`` catches what ``ebft train`` would reject, before any weights load and without running
code from the config (``train.preflight``), and types strictly: a bool is not a count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ebft.cli import main


@pytest.fixture
def env(tmp_path, tiny_model_dir):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "def f():\n    return 1\n" * 20}) + "\n")

    def write(**over) -> Path:
        cfg = {
            "base_model": str(tiny_model_dir),
            "rl": "ebft",
            "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 4},
            "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
            "sequence_len": 64,
            "output_dir": str(tmp_path / "run"),
            **over,
        }
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    write.data = data
    write.tmp = tmp_path
    return write


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


def test_a_valid_config_still_validates(env, capsys):
    assert main(["validate", str(env())]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sequence_len"] == 64


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("--ebft.n_samples_per_prompt=true", "ebft.n_samples_per_prompt: must be a whole number, not true or false"),
        ("--micro_batch_size=false", "micro_batch_size: must be a whole number, not true or false"),
        ("--trl.top_k=true", "trl.top_k: must be a whole number, not true or false"),
        ("--learning_rate=true", "learning_rate: must be a number, not true or false"),
        ("--max_steps=true", "max_steps: must be a whole number, not true or false"),
    ],
)
def test_a_bool_is_not_a_count(env, capsys, override, shown):
    """(before: n_samples_per_prompt: true was taken as 1)"""
    assert shown in _error(capsys, "validate", str(env()), override)


def test_bools_stay_bools(env, capsys):
    assert (
        main(["validate", str(env()), "--ebft.use_whitening=true", "--bf16=false", "--ebft.n_samples_per_prompt=2"])
        == 0
    )


def test_sequence_len_beyond_the_models_positions(env, capsys, tiny_model_dir):
    max_pos = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    err = _error(capsys, "validate", str(env(sequence_len=10**12)))
    assert err == f"error: sequence_len: 1000000000000 exceeds the model's max_position_embeddings ({max_pos})"


def test_a_dataset_without_the_type_it_needs(env, capsys):
    err = _error(capsys, "validate", str(env(datasets=[{"path": str(env.data)}])))
    assert "no type, so its rows are used as they are, but they have no input_ids / labels" in err
    assert "ebft_pretrain.transform" in err
    # Rows that are already tokens need no transform.
    tokens = env.tmp / "tokens.jsonl"
    tokens.write_text(json.dumps({"input_ids": list(range(40)), "labels": list(range(40))}) + "\n")
    assert main(["validate", str(env(datasets=[{"path": str(tokens)}]))]) == 0


def test_missing_files_and_folders(env, capsys, tiny_model_dir):
    missing = env.tmp / "nowhere"
    assert f"tokenizer_config: no such folder '{missing}'" in _error(
        capsys, "validate", str(env(tokenizer_config=str(missing)))
    )
    assert f"base_model: no such folder '{missing}'" in _error(capsys, "validate", str(env(base_model=str(missing))))
    data = {"path": str(missing / "d.jsonl"), "type": "ebft_pretrain.transform"}
    assert f"dataset '{missing / 'd.jsonl'}': no such file or folder" in _error(
        capsys, "validate", str(env(datasets=[data]))
    )
    # A model folder without a tokenizer.
    bare = env.tmp / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare / "config.json")
    assert "holds no tokenizer" in _error(capsys, "validate", str(env(base_model=str(bare))))


def test_custom_transforms_are_looked_up_not_run(env, capsys):
    """A transform module next to the config is found, but validate does not import it (its code runs only
    when train loads the data); a module that is nowhere is an error."""
    marker = env.tmp / "imported"
    (env.tmp / "my_transform.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\n"
        "def transform(cfg, **kwargs):\n    return (lambda row: row), {}\n"
    )
    data = {"path": str(env.data), "type": "my_transform.transform"}
    assert main(["validate", str(env(datasets=[data]))]) == 0
    assert not marker.exists()
    err = _error(capsys, "validate", str(env(datasets=[{**data, "type": "not_here.transform"}])))
    assert "dataset type 'not_here.transform': no module 'not_here'" in err


def test_train_rejects_the_same(env, capsys):
    """The oracle: each case validate now refuses is one that train refuses too (with the same message)."""
    for over in ({"sequence_len": 10**12}, {"tokenizer_config": str(env.tmp / "nowhere")}):
        path = str(env(**over))
        assert _error(capsys, "validate", path) == _error(capsys, "train", path)
