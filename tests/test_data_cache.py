"""``dataset_prepared_path`` and ``ebft preprocess``.

The transform here counts its calls in a file, so a run that reuses the prepared rows is seen not to
transform anything; the rows read back equal the rows prepared without a cache, in both modes; every input
that changes the rows changes the entry's key and nothing else does; a damaged entry is prepared again with
a warning. On the code before this change ``dataset_prepared_path`` was ignored with a warning and there
was no ``ebft preprocess``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from ebft.cli import main
from ebft.config import load_config
from ebft.data.cache import MANIFEST, cache_key, load_datasets
from ebft.data.load import load_strided_datasets
from ebft.data.structured import load_structured_datasets
from ebft.modeling.tokenizer import load_tokenizer

TRANSFORMS = textwrap.dedent(
    '''
    """Test transforms that count their calls in calls.txt next to this file."""
    from pathlib import Path

    CALLS = Path(__file__).with_name("calls.txt")


    def _count():
        with CALLS.open("a") as f:
            f.write("x")


    def strided(cfg, **kwargs):
        def fn(example, tokenizer=None):
            _count()
            ids = tokenizer(example["text"])["input_ids"][: cfg.sequence_len]
            return {"input_ids": ids, "labels": ids}

        return fn, {"remove_columns": "__all__"}


    def structured(cfg, **kwargs):
        def fn(example, tokenizer=None):
            _count()
            return {"prompt": [{"role": "user", "content": example["q"]}], "ground_truth": example["a"]}

        return fn, {"remove_columns": "__all__"}
    '''
)


def _module(tmp_path: Path) -> str:
    """A module name of this test's own: each test's transforms count into its own folder."""
    return "counting_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)


def _setup(tmp_path: Path, model_dir: Path, mode: str, **keys) -> Path:
    (tmp_path / f"{_module(tmp_path)}.py").write_text(TRANSFORMS)
    if mode == "strided":
        rows = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 6} for i in range(6)]
        extra = {"ebft": {"mode": "strided", "stride": 4, "context_length": 4, "generate_max_len": 4}}
    else:
        rows = [{"q": f"What is {i} + {i}?", "a": f"It is {2 * i}."} for i in range(6)]
        extra = {"ebft": {"mode": "structured"}, "trl": {"max_completion_length": 16}, "micro_batch_size": 4}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "datasets": [{"path": str(tmp_path / "rows.jsonl"), "type": f"{_module(tmp_path)}.{mode}"}],
        "sequence_len": 64,
        "val_set_size": 2,
        "max_steps": 1,
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        **extra,
        **keys,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _calls(tmp_path: Path) -> int:
    calls = tmp_path / "calls.txt"
    return len(calls.read_text()) if calls.exists() else 0


def _rows(data, mode: str):
    if mode == "strided":
        return data.train.to_dict(), data.val.to_dict(), data.skipped
    return data.train, data.val, data.skipped


@pytest.mark.parametrize("mode", ["strided", "structured"])
def test_second_run_reads_the_rows_back(mode, tiny_model_dir, tmp_path, caplog):
    cfg = load_config(_setup(tmp_path, tiny_model_dir, mode))
    tokenizer = load_tokenizer(cfg)
    fresh = (load_strided_datasets if mode == "strided" else load_structured_datasets)(
        cfg, tokenizer, search_dir=tmp_path
    )
    uncached = _calls(tmp_path)
    assert uncached == 6  # one call per row
    with caplog.at_level(logging.INFO, logger="ebft"):
        first = load_datasets(cfg, tokenizer, search_dir=tmp_path)
        prepared = _calls(tmp_path)  # (datasets may reuse its own map cache of the strided rows)
        second = load_datasets(cfg, tokenizer, search_dir=tmp_path)
    if mode == "structured":
        assert prepared == 2 * uncached
    assert _calls(tmp_path) == prepared  # the second run transformed nothing
    messages = [r.getMessage() for r in caplog.records if r.name == "ebft"]
    entry = tmp_path / "prepared" / cache_key(cfg, tokenizer, tmp_path)[0]
    assert any(
        m.startswith(f"dataset_prepared_path: no prepared rows for these inputs yet; preparing them into {entry}")
        for m in messages
    )
    assert (
        f"dataset_prepared_path: reusing the prepared rows in {entry} (4 training rows, 2 validation rows, "
        "0 skipped)" in messages
    )
    assert _rows(first, mode) == _rows(second, mode) == _rows(fresh, mode)


def test_every_input_that_changes_the_rows_changes_the_key(tiny_model_dir, tmp_path):
    path = _setup(tmp_path, tiny_model_dir, "strided")
    cfg = load_config(path)
    tokenizer = load_tokenizer(cfg)

    def key(overrides=(), tok=None):
        return cache_key(load_config(path, list(overrides)), tok or tokenizer, tmp_path)[0]

    base = key()
    assert key(["--learning_rate=0.5", "--max_steps=9", "--output_dir=elsewhere"]) == base  # not about the rows
    changed = {
        "sequence_len": key(["--sequence_len=48"]),
        "stride": key(["--ebft.stride=2"]),
        "context_length": key(["--ebft.context_length=2"]),
        "generate_max_len": key(["--ebft.generate_max_len=2"]),
        "min_completion_prefix": key(["--ebft.min_completion_prefix=1"]),
        "val_set_size": key(["--val_set_size=1"]),
        "seed": key(["--seed=7"]),
        "split": key(["--datasets.0.split=train[:4]"]),
        "special tokens": key(tok=load_tokenizer(load_config(path, ["--special_tokens.pad_token=<unk>"]))),
        "chat template": key(tok=load_tokenizer(load_config(path, ["--chat_template=chatml"]))),
    }
    rows = tmp_path / "rows.jsonl"
    rows.write_text(rows.read_text() + json.dumps({"text": "one more document, long enough " * 4}) + "\n")
    changed["data file"] = key()
    stat = rows.stat()
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed["modification time"] = key()
    module = tmp_path / f"{_module(tmp_path)}.py"
    module.write_text(module.read_text() + "\n# edited\n")
    changed["transform source"] = key()
    assert base not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed


def test_a_damaged_entry_is_prepared_again(tiny_model_dir, tmp_path, caplog):
    cfg = load_config(_setup(tmp_path, tiny_model_dir, "structured"))
    tokenizer = load_tokenizer(cfg)
    good = load_datasets(cfg, tokenizer, search_dir=tmp_path)
    entry = tmp_path / "prepared" / cache_key(cfg, tokenizer, tmp_path)[0]
    assert (entry / MANIFEST).is_file()
    (entry / "train.jsonl").write_text('{"prompt": "cut sh')  # a half-written file
    with caplog.at_level(logging.WARNING, logger="ebft"):
        again = load_datasets(cfg, tokenizer, search_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"dataset_prepared_path: the prepared rows in {entry} cannot be read (")
    assert warnings[0].endswith("; preparing them again")
    assert _rows(again, "structured") == _rows(good, "structured")
    assert _rows(load_datasets(cfg, tokenizer, search_dir=tmp_path), "structured") == _rows(good, "structured")


def test_a_strided_entry_missing_its_arrow_files_is_prepared_again(tiny_model_dir, tmp_path, caplog):
    cfg = load_config(_setup(tmp_path, tiny_model_dir, "strided"))
    tokenizer = load_tokenizer(cfg)
    good = load_datasets(cfg, tokenizer, search_dir=tmp_path)
    entry = tmp_path / "prepared" / cache_key(cfg, tokenizer, tmp_path)[0]
    shutil.rmtree(entry / "train")
    with caplog.at_level(logging.WARNING, logger="ebft"):
        again = load_datasets(cfg, tokenizer, search_dir=tmp_path)
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    assert _rows(again, "strided") == _rows(good, "strided")


def test_preprocess_fills_the_cache_that_train_reads(tiny_model_dir, tmp_path, capsys):
    path = _setup(tmp_path, tiny_model_dir, "strided")
    assert main(["preprocess", str(path)]) == 0
    prepared = _calls(tmp_path)
    assert prepared == 6 and len(list((tmp_path / "prepared").iterdir())) == 1
    assert not (tmp_path / "out").exists()  # preprocess trains nothing
    assert main(["train", str(path)]) == 0
    assert _calls(tmp_path) == prepared
    assert "dataset_prepared_path: reusing the prepared rows in" in " ".join(capsys.readouterr().err.split())


def test_preprocess_without_the_key_uses_axolotls_default_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _setup(tmp_path, tiny_model_dir, "structured", dataset_prepared_path=None)
    assert main(["preprocess", str(path)]) == 0
    entries = list((tmp_path / "last_run_prepared").iterdir())
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    err = " ".join(capsys.readouterr().err.split())
    assert "dataset_prepared_path is not set; preparing into ./last_run_prepared (set dataset_prepared_path: " in err
