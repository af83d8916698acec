"""``ebft validate`` catches what ``ebft train`` would reject, before any weights load (``train.preflight``),
and types strictly: a bool is not a count."""

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


def _problems(capsys, *argv: str) -> list[str]:
    """The problem lines of a preflight error (``error: ...: N problem(s):`` then one line each)."""
    return [line.strip() for line in _error(capsys, *argv).splitlines()[1:]]


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
    problems = _problems(capsys, "validate", str(env(sequence_len=10**12)))
    assert problems == [f"sequence_len: 1000000000000 exceeds the model's max_position_embeddings ({max_pos})"]


def test_a_dataset_without_the_type_it_needs(env, capsys):
    (problem,) = _problems(capsys, "validate", str(env(datasets=[{"path": str(env.data)}])))
    assert problem.startswith("datasets.0.type: none, so the rows are used as they are, but they have no input_ids")
    assert "ebft_pretrain.transform" in problem
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
    assert f"datasets.0.path: no such file or folder '{missing / 'd.jsonl'}'" in _error(
        capsys, "validate", str(env(datasets=[data]))
    )
    # A model folder without a tokenizer.
    bare = env.tmp / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir / "config.json", bare / "config.json")
    assert "holds no tokenizer" in _error(capsys, "validate", str(env(base_model=str(bare))))


def test_train_rejects_the_same(env, capsys):
    """The oracle: each case validate now refuses is one that train refuses too (with the same problem)."""
    untyped = [{"path": str(env.data)}]
    for over in ({"sequence_len": 10**12}, {"tokenizer_config": str(env.tmp / "nowhere")}, {"datasets": untyped}):
        path = str(env(**over))
        assert _problems(capsys, "validate", path) == _problems(capsys, "train", path)
