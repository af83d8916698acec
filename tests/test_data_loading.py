"""Strided-mode data loading: raw local files and hub ids, validation splits, custom transforms, unusable and
pre-tokenized rows, malformed transform outputs, and collation.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import uuid

import pytest
import torch
from data_builders import EOS, PAD, SPECIAL_DOCS, make_cfg, make_spec, write_jsonl

from ebft.data.collate import collate_documents
from ebft.data.load import load_raw, load_strided_datasets
from ebft.data.rows import ERROR, ROW, apply_transform, validate_row
from ebft.data.transforms import ebft_pretrain, ebft_strided_chat, ebft_strided_structured, resolve_transform
from ebft.errors import DataError

# --- load_raw ----------------------------------------------------------------------------------

RECORDS = [{"text": f"document {i}", "n": i} for i in range(4)]


def write_records(folder, kind, records=RECORDS, stem="data"):
    path = folder / f"{stem}.{kind}"
    if kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "jsonl":
        write_jsonl(path, records)
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", [0, 1, 2, 3]), ("train[:2]", [0, 1]), ("train[:50%]", [0, 1]), ("train[-1:]", [3])],
)
def test_load_raw_local_files_with_split_slices(tmp_path, kind, split, expected):
    path = write_records(tmp_path, kind)
    ds = load_raw(make_spec(path, split=split))
    assert ds["n"] == expected
    assert ds["text"] == [f"document {i}" for i in expected]


def test_load_raw_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n\nline four\n")
    (tmp_path / "b.txt").write_text("second file\n")
    assert load_raw(make_spec(tmp_path / "a.txt"))["text"] == ["line one\nline two\n\nline four\n"]
    assert load_raw(make_spec(tmp_path))["text"] == ["line one\nline two\n\nline four\n", "second file\n"]


def test_load_raw_folder_reads_all_files_of_its_type(tmp_path):
    write_records(tmp_path, "jsonl", RECORDS[:2], stem="part-0")
    (tmp_path / "sub").mkdir()
    write_records(tmp_path / "sub", "jsonl", RECORDS[2:], stem="part-1")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".cache").mkdir()
    write_records(tmp_path / ".cache", "jsonl", RECORDS, stem="stale")
    assert load_raw(make_spec(tmp_path))["n"] == [0, 1, 2, 3]
    assert load_raw(make_spec(tmp_path, split="train[1:3]"))["n"] == [1, 2]
    assert load_raw(make_spec(tmp_path, data_files="sub/*.jsonl"))["n"] == [2, 3]


def test_load_raw_errors_name_the_dataset(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=f"dataset '{missing}': no such file or folder"):
        load_raw(make_spec(missing))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        load_raw(make_spec(odd))
    good = write_records(tmp_path, "jsonl")
    with pytest.raises(DataError, match=rf"dataset '{good}' \(split 'test'\): ValueError: Unknown split"):
        load_raw(make_spec(good, split="test"))
    write_records(tmp_path, "csv")
    with pytest.raises(DataError, match="mixes file types"):
        load_raw(make_spec(tmp_path))
    (tmp_path / "blank.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty file\(s\) \['blank.jsonl'\]"):
        load_raw(make_spec(tmp_path / "blank.jsonl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="the folder has no"):
        load_raw(make_spec(empty))


def test_load_raw_hub_id_is_passed_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["x"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = make_spec("org/corpus", name="python", split="train[:1%]", data_files="data/*.parquet")
    assert load_raw(spec)["text"] == ["x"]
    assert calls == [(("org/corpus", "python"), {"split": "train[:1%]", "data_files": "data/*.parquet"})]

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="dataset 'org/corpus' .*ConnectionError: Couldn't reach"):
        load_raw(spec)


# --- validation split ----------------------------------------------------------------------------


def eight_pairs(tmp_path):
    rows = [{"input": f"question {i}", "output": f"the answer is {i} and more words"} for i in range(8)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.parametrize(("val_set_size", "n_val"), [(0.25, 2), (3, 3), (3.0, 3)])
def test_val_set_size_fraction_or_count(tmp_path, tiny_tokenizer, val_set_size, n_val):
    spec = make_spec(eight_pairs(tmp_path), "ebft_strided_structured.transform")
    data = load_strided_datasets(make_cfg(spec, val_set_size=val_set_size, seed=3), tiny_tokenizer)
    assert (len(data.train), len(data.val)) == (8 - n_val, n_val)
    everything = load_strided_datasets(make_cfg(spec), tiny_tokenizer).train["input_ids"]
    assert sorted([*data.train["input_ids"], *data.val["input_ids"]]) == sorted(everything)
    again = load_strided_datasets(make_cfg(spec, val_set_size=val_set_size, seed=3), tiny_tokenizer)
    assert again.val["input_ids"] == data.val["input_ids"]  # the seed fixes the split


def test_val_set_size_too_large_is_an_error(tmp_path, tiny_tokenizer):
    spec = make_spec(eight_pairs(tmp_path), "ebft_strided_structured.transform")
    with pytest.raises(DataError, match="val_set_size=8 leaves no training rows out of 8"):
        load_strided_datasets(make_cfg(spec, val_set_size=8), tiny_tokenizer)


# --- custom transforms ---------------------------------------------------------------------------

CUSTOM_MODULE = """
def transform(cfg, **kwargs):
    def fn(example, tokenizer=None):
        ids = [int(t) for t in example["question"].split()]
        return {"input_ids": ids, "labels": ids}
    return fn, {"remove_columns": "__all__"}


def keep_answer(cfg, **kwargs):
    fn, _ = transform(cfg)
    return fn, {"remove_columns": ["question", "not_a_column"]}


def batched(cfg, **kwargs):
    def fn(batch, tokenizer=None):
        if "bad" in batch["question"]:
            raise ValueError("cannot parse 'bad'")
        ids = [[int(t) for t in q.split()] for q in batch["question"]]
        return {"input_ids": ids, "labels": ids}
    return fn, {"remove_columns": "__all__", "batched": True}
"""


@pytest.fixture
def custom_module(tmp_path):
    name = f"ebft_custom_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(CUSTOM_MODULE)
    yield name
    sys.modules.pop(name, None)


def qa_dataset(questions):
    from datasets import Dataset

    return Dataset.from_dict({"question": questions, "answer": [f"a{i}" for i in range(len(questions))]})


def test_custom_transform_by_dotted_path_removes_all_columns(tmp_path, custom_module, tiny_tokenizer):
    factory = resolve_transform(f"{custom_module}.transform", search_dir=tmp_path)
    assert str(tmp_path) not in sys.path  # the search folder is only on sys.path during the import
    fn, options = factory(make_cfg())
    out = apply_transform(qa_dataset(["7 8 9", "10"]), fn, options, tiny_tokenizer)
    assert out.column_names == ["input_ids", "labels", "prompt_length", ERROR, ROW]
    assert out["input_ids"] == [[7, 8, 9], [10]]
    assert out[ERROR] == [None, None]


def test_custom_transform_explicit_remove_columns_keeps_the_others(tmp_path, custom_module, tiny_tokenizer):
    fn, options = resolve_transform(f"{custom_module}.keep_answer", search_dir=tmp_path)(make_cfg())
    out = apply_transform(qa_dataset(["7 8 9", "10"]), fn, options, tiny_tokenizer)
    assert "question" not in out.column_names
    assert out["answer"] == ["a0", "a1"]
    assert out["input_ids"] == [[7, 8, 9], [10]]


def test_batched_transform_failure_loses_only_the_bad_row(tmp_path, custom_module, tiny_tokenizer):
    fn, options = resolve_transform(f"{custom_module}.batched", search_dir=tmp_path)(make_cfg())
    out = apply_transform(qa_dataset(["7 8", "bad", "9"]), fn, options, tiny_tokenizer)
    assert out["input_ids"] == [[7, 8], [], [9]]
    assert out[ERROR] == [None, "transform raised ValueError: cannot parse 'bad'", None]
    assert out[ROW] == [0, 1, 2]


def test_custom_transform_through_the_loader(tmp_path, custom_module, tiny_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "7 8 9", "answer": "x"}, {"question": "11", "answer": "y"}])
    cfg = make_cfg(make_spec(path, f"{custom_module}.transform"))
    data = load_strided_datasets(cfg, tiny_tokenizer, search_dir=tmp_path)
    # The one-token row has no block (context_length 1 + generate_max_len 1 = 2 tokens needed).
    assert data.train["input_ids"] == [[7, 8, 9]]
    assert data.skipped == 1
    assert data.first_skip_reason.startswith(f"dataset '{path}', row 1: no strided block fits: 1 tokens")


@pytest.mark.parametrize(
    ("type_name", "message"),
    [
        (
            "no_such_module_for_ebft.transform",
            "dataset type 'no_such_module_for_ebft.transform': cannot import",
        ),
        ("ebft_pretrain.no_such_function", "module 'ebft.data.transforms.ebft_pretrain' has no function"),
        ("transform", "is not of the form 'module.function'"),
    ],
)
def test_unknown_transform_is_a_data_error(type_name, message):
    with pytest.raises(DataError, match=message):
        resolve_transform(type_name)


def test_builtin_names_resolve_to_this_package():
    assert resolve_transform("ebft_pretrain.transform") is ebft_pretrain.transform
    assert resolve_transform("ebft_strided_structured.transform") is ebft_strided_structured.transform
    assert resolve_transform("ebft_strided_chat.transform") is ebft_strided_chat.transform


# --- skipping and validation ---------------------------------------------------------------------


def test_unusable_rows_are_counted_and_the_first_is_named(tmp_path, tiny_tokenizer, caplog):
    rows = [
        {"input": "q", "output": "a long enough answer for at least one block"},
        {"input": "q"},  # no completion
        {"input": "q", "output": ""},  # completion = EOS only: too short for a block
        {"input": "another question", "output": "another long enough answer to keep"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    spec = make_spec(path, "ebft_strided_structured.transform")
    # A block needs prompt_length + 4 tokens: anchor at the prompt's end, generate_max_len 4.
    cfg = make_cfg(spec, generate_max_len=4)
    with caplog.at_level(logging.WARNING, logger="ebft"):
        data = load_strided_datasets(cfg, tiny_tokenizer)
    assert len(data.train) == 2
    assert data.skipped == 2
    assert data.first_skip_reason.startswith(
        f"dataset '{path}', row 1: transform raised ValueError: no completion column"
    )
    (record,) = [r for r in caplog.records if r.name == "ebft"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"Skipped 2 unusable rows of '{path}'")
    assert "row 1: transform raised ValueError: no completion column" in record.getMessage()


def test_nothing_left_is_a_data_error_with_the_first_reason(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"input": "q", "output": ""}, {"input": "q", "output": ""}])
    cfg = make_cfg(make_spec(path, "ebft_strided_structured.transform"), generate_max_len=4)
    with pytest.raises(DataError, match=rf"all 2 rows of '{path}' were skipped; first: .*row 0: no strided block"):
        load_strided_datasets(cfg, tiny_tokenizer)


def test_pretokenized_rows_pass_through_and_concatenate(tmp_path, tiny_tokenizer):
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "prompt_length": 1}])
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SPECIAL_DOCS[:1]])
    cfg = make_cfg(make_spec(pre), make_spec(docs, "ebft_pretrain.transform", pack=False))
    data = load_strided_datasets(cfg, tiny_tokenizer)
    assert data.train[:] == {
        "input_ids": [[7, 8, 9], [4, 5, 6, EOS]],
        "labels": [[-100, 8, 9], [4, 5, 6, EOS]],
        "prompt_length": [1, None],
    }
    # Dataset rows go straight into the collator.
    batch = collate_documents(list(data.train), pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[7, 8, 9, PAD], [4, 5, 6, EOS]]
    assert batch.prompt_length.tolist() == [1, -1]


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"input_ids": [], "labels": []}, "input_ids is empty"),
        ({"input_ids": [1, 2]}, "no 'labels'"),
        ({"input_ids": [1, 2], "labels": [1]}, "labels has 1 entries but input_ids has 2"),
        (
            {"input_ids": [1, 384], "labels": [1, 2]},
            r"token id 384 is outside the tokenizer's vocabulary \[0, 384\)",
        ),
        ({"input_ids": [1, 2], "labels": [-1, 2]}, "labels must be token ids or -100"),
        ({"input_ids": "1 2", "labels": [1, 2]}, "input_ids must be a list of integers"),
        ({"input_ids": [1, 2], "labels": [1, 2], "prompt_length": 3}, r"prompt_length 3 is outside \[0, 2\]"),
        ({"input_ids": [1, 2], "labels": [1, 2], "prompt_length": 1.5}, "prompt_length must be an integer"),
    ],
)
def test_malformed_transform_outputs_are_rejected(output, message):
    with pytest.raises((TypeError, ValueError), match=message):
        validate_row(output, vocab_size=384)


# --- collation -------------------------------------------------------------------------------------


def test_collate_right_pads_and_marks_missing_prompts():
    rows = [
        {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "prompt_length": 1},
        {"input_ids": [10], "labels": [10], "prompt_length": None},
        {"input_ids": [11, 12], "labels": [11, 12]},
    ]
    batch = collate_documents(rows, pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[7, 8, 9], [10, PAD, PAD], [11, 12, PAD]]
    assert batch.labels.tolist() == [[-100, 8, 9], [10, -100, -100], [11, 12, -100]]
    assert batch.lengths.tolist() == [3, 1, 2]
    assert batch.prompt_length.tolist() == [1, -1, -1]
    for tensor in (batch.input_ids, batch.labels, batch.lengths, batch.prompt_length):
        assert tensor.dtype == torch.long
    assert batch.to("cpu").input_ids.shape == (3, 3)
    with pytest.raises(ValueError, match="empty"):
        collate_documents([], pad_token_id=PAD)


def test_the_transform_map_is_keyed_by_its_inputs_not_by_pickling_its_closure(tmp_path, tiny_tokenizer):
    """``datasets`` would pickle the map's closure to hash it: a transform holding an unpicklable object (a lock)
    then gets a random key, so the same inputs are mapped again every time, and a Ctrl-C landing in that
    pickling is swallowed by datasets' bare ``except:``. ebft keys the map itself: the same rows, transform,
    options, tokenizer and context read the cached result (the transform is not called); another context maps
    again."""
    import threading

    calls = []
    guard = threading.Lock()  # unpicklable: the closure cannot be hashed by pickling

    def fn(example, tokenizer):
        with guard:
            calls.append(example["question"])
        return {"input_ids": [int(example["question"])], "labels": [int(example["question"])]}

    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": str(7 + i), "answer": "a"} for i in range(3)])
    options = {"remove_columns": "__all__"}
    first = apply_transform(load_raw(make_spec(path)), fn, options, tiny_tokenizer, context="cfg A")
    assert first["input_ids"] == [[7], [8], [9]] and len(calls) == 3
    again = apply_transform(load_raw(make_spec(path)), fn, options, tiny_tokenizer, context="cfg A")
    assert again["input_ids"] == [[7], [8], [9]] and len(calls) == 3  # read from the cache: fn not called
    other = apply_transform(load_raw(make_spec(path)), fn, options, tiny_tokenizer, context="cfg B")
    assert other["input_ids"] == [[7], [8], [9]] and len(calls) == 6
