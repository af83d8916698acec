"""Bad input through ``ebft.cli.main``: every case in bad_input_cases.py is one clear error line without a
traceback (tracebacks only with --debug), and a partly bad dataset skips its bad rows with a warning and trains.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_cases import CASES, Env, error_message, jsonl
from conftest import stdlib_texts

from ebft.cli import main
from ebft.errors import ConfigError


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    docs = [text[:3000] for text in stdlib_texts(12) if len(text) >= 3000][:4]
    path = tmp_path_factory.mktemp("bad-input-data") / "text.jsonl"
    path.write_text(jsonl([{"text": doc} for doc in docs]), encoding="utf-8")
    return path


@pytest.mark.parametrize(("builder", "code", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, tiny_model_dir, text_file, capsys, builder, code, expected):
    argv = builder(Env(tmp_path, tiny_model_dir, text_file))
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    message = error_message(captured.err)
    for part in expected:
        assert part.replace("{tmp}", str(tmp_path)) in message, (part, message)


@pytest.mark.parametrize("where", ["before the command", "after the config"])
def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, text_file, where):
    env = Env(tmp_path, tiny_model_dir, text_file)
    path = env.write(env.config(ebft={"stride": 0}))
    argv = ["--debug", "validate", str(path)] if where == "before the command" else ["validate", str(path), "--debug"]
    with pytest.raises(ConfigError, match="ebft.stride: must be >= 1"):
        main(argv)


def test_the_process_prints_a_traceback_only_with_debug(tmp_path, tiny_model_dir, text_file):
    env = Env(tmp_path, tiny_model_dir, text_file)
    path = env.write(env.config(ebft={"stride": 0}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ebft", *args], capture_output=True, text=True, timeout=120)

    plain = run("validate", str(path))
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "ebft.stride: must be >= 1" in error_message(plain.stderr)
    debug = run("--debug", "validate", str(path))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ebft.errors.ConfigError" in debug.stderr and "ebft.stride: must be >= 1" in debug.stderr


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_partly_bad_dataset_skips_rows_with_a_warning_and_trains(tmp_path, tiny_model_dir, text_file):
    env = Env(tmp_path, tiny_model_dir, text_file)
    good = [json.loads(line) for line in text_file.read_text().splitlines()][:2]
    rows = [good[0], {"body": "no text here"}, {"text": ""}, good[1]]
    data = tmp_path / "mixed.jsonl"
    data.write_text(jsonl(rows), encoding="utf-8")
    config = env.config(datasets=[{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}])
    collect = _Collect()
    logging.getLogger("ebft").addHandler(collect)
    try:
        assert main(env.train(config)) == 0
    finally:
        logging.getLogger("ebft").removeHandler(collect)
    (skipped,) = [m for m in collect.messages if m.startswith("Skipped")]
    # Row 1 has no text column (null after the json loader unifies the columns); row 2 is only the
    # EOS token that pack: false appends, 1 token where a block needs 16.
    assert skipped.startswith(f"Skipped 2 unusable rows of '{data}'")
    assert f"first: dataset '{data}', row 1: transform raised TypeError: column 'text' holds NoneType" in skipped
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
