"""Property-based bad input: random configs through ``ebft validate`` and random rows through the data layer
(strided and structured) either load or fail with one clean error.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from bad_input_cases import EBFT, error_message, jsonl
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ebft.cli import main
from ebft.config import (
    IGNORED_AXOLOTL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    DatasetSpec,
    EbftSection,
    TrainConfig,
    parse_config,
)
from ebft.data.load import load_strided_datasets
from ebft.errors import EbftError

# ---------------------------------------------------------------------------------------------
# Property-based: random configs through `ebft validate`


def _keys_of(model) -> list[str]:
    return list(model.model_fields)


ROOT_KEYS = [*_keys_of(TrainConfig), *IGNORED_AXOLOTL_KEYS, *UNSUPPORTED_AXOLOTL_KEYS]
EBFT_KEYS = _keys_of(EbftSection)
DATASET_KEYS = [*_keys_of(DatasetSpec), "train_on_split"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 8, 2**31, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, 1e-12, 1e308]),
    st.text(max_size=12),
    st.sampled_from(["", "auto", "strided", "structured", "lora", "ebft", "rloo", "cpu", "a.b", "train[:50%]"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_odd_keys = st.one_of(st.text(max_size=10), st.integers(-3, 3), st.booleans(), st.none())


_SECTIONS = ["ebft", "datasets", "datasets.0", "special_tokens", "trl", "gradient_checkpointing_kwargs"]


@st.composite
def _random_configs(draw) -> object:
    """A mostly valid config with random values on known keys, random unknown keys and odd shapes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_values)  # sometimes not a mapping at all
    config: dict = {
        "base_model": "org/model",
        "rl": "ebft",
        "ebft": dict(EBFT),
        "datasets": [{"path": "data.jsonl", "type": "ebft_pretrain.transform"}],
        "sequence_len": 32,
    }
    for section, keys in ((config, ROOT_KEYS), (config["ebft"], EBFT_KEYS), (config["datasets"][0], DATASET_KEYS)):
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
            section[key] = draw(_values)
        section.update(draw(st.dictionaries(_odd_keys, _values, max_size=2)))
    # A whole section of the wrong shape: a scalar, a list or a mapping where another is expected.
    name = draw(st.sampled_from([None, *_SECTIONS]))
    if name is not None:
        value = draw(_scalars | _values)
        if name == "datasets.0":
            config["datasets"] = [value]
        else:
            config[name] = value
    return config


_override_keys = st.one_of(
    st.sampled_from([*ROOT_KEYS, *(f"ebft.{k}" for k in EBFT_KEYS), *(f"datasets.0.{k}" for k in DATASET_KEYS)]),
    st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,4}){0,2}", fullmatch=True),
)
_overrides = st.lists(st.builds(lambda key, value: f"--{key}={value}", _override_keys, st.text(max_size=8)), max_size=2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=_random_configs(), overrides=_overrides)
@example(config={"base_model": "m", "rl": "ebft", "ebft": {"mode": "strided"}, "datasets": 1}, overrides=[])
def test_random_configs_validate_or_fail_cleanly(config, overrides, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        code = main(["validate", str(path), *overrides])
    captured = capsys.readouterr()
    event(f"exit {code}")
    assert code in (0, 2), captured.err
    if code == 2:
        assert "Traceback" not in captured.err
        assert error_message(captured.err).strip() != "error:"
    else:
        assert yaml.safe_load(captured.out)["rl"] == "ebft"


# ---------------------------------------------------------------------------------------------
# Property-based: random rows through the data layer

ROW_FIELDS = [
    "text",
    "content",
    "question",
    "input",
    "output",
    "prompt",
    "completion",
    "answer",
    "messages",
    "conversations",
    "input_ids",
    "labels",
    "prompt_length",
]
CODE = ["def f(x):\n    return x + 1\n" * 4, "import os\nprint(os.getcwd())\n" * 3, "x = [i * i for i in range(10)]\n"]
# Real code (long enough for a block) as often as random or degenerate text.
_texts = st.sampled_from(CODE) | st.text(max_size=80) | st.sampled_from(["", " ", "<|user|><|assistant|>"])
_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": _texts})
    | st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": _texts})
    | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    max_size=4,
)
# Mostly token ids of the tiny vocabulary (384), sometimes negative or far beyond it.
_ids = st.lists(st.integers(0, 383) | st.integers(-200, 2**40), min_size=0, max_size=40)
_usable_ids = st.integers(12, 24).flatmap(lambda n: st.lists(st.integers(7, 383), min_size=n, max_size=n))
_user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": _texts})
_assistant_turn = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.sampled_from(CODE)})
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.integers(-200, 500),
    st.floats(allow_nan=False, allow_infinity=False),
    _texts,
)
_row_values = st.one_of(_json_scalars, _ids, _messages, st.lists(_json_scalars, max_size=4))
# Row shapes the transforms expect, keyed by the transform (None: already tokenized rows).
_PLAUSIBLE = {
    "ebft_pretrain.transform": st.fixed_dictionaries({"text": _texts}),
    "ebft_strided_structured.transform": st.fixed_dictionaries({"input": _texts, "output": _texts}),
    "ebft_strided_chat.transform": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn).map(list)}
    ),
    None: st.fixed_dictionaries(
        {"input_ids": _ids | _usable_ids, "labels": _ids | _usable_ids}, optional={"prompt_length": st.integers(-2, 50)}
    ),
}


@st.composite
def _row(draw, kind) -> dict:
    """A row of the expected shape, sometimes damaged: a field dropped, replaced or added."""
    row = dict(draw(_PLAUSIBLE[kind]))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(
            st.sampled_from(sorted(row) or ROW_FIELDS) | st.sampled_from(ROW_FIELDS) | st.text(min_size=1, max_size=6)
        )
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(_row_values)
    return row


@st.composite
def _dataset_cases(draw) -> tuple[dict, list[dict]]:
    """(dataset entry options, rows); the rows usually, but not always, suit the entry's transform."""
    transform = draw(st.sampled_from(list(_PLAUSIBLE)))
    kind = draw(st.sampled_from([transform, transform, transform, *_PLAUSIBLE]))
    entry = {"type": transform} if transform else {}
    if transform == "ebft_pretrain.transform":
        entry.update(
            draw(st.fixed_dictionaries({}, optional={"pack": st.booleans(), "field": st.sampled_from(ROW_FIELDS)}))
        )
    return entry, draw(st.lists(_row(kind), min_size=1, max_size=6))


def _kept_rows_or_clean_error(load, cfg, tokenizer) -> list:
    """The rows ``load(cfg, tokenizer)`` kept (train and validation; never none), or [] after checking
    that its failure was a clean EbftError with a message."""
    try:
        data = load(cfg, tokenizer)
    except EbftError as exc:
        assert str(exc).strip()
        event("clean error: " + re.sub(r"'[^']*'", "'...'", str(exc))[:40])
        return []
    event("loaded, some rows skipped" if data.skipped else "loaded")
    kept = list(data.train) + (list(data.val) if data.val is not None else [])
    assert kept
    return kept


@pytest.fixture(scope="module")
def rows_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("random-rows")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=_dataset_cases(),
    layout=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(0, 3)),
    val_set_size=st.sampled_from([0.0, 0.5, 1, 3]),
)
# Rows of empty objects: datasets finds no data at all (its ValueError must become a DataError).
@example(case=({"type": "ebft_pretrain.transform"}, [{}, {}]), layout=(1, 1, 1, 0), val_set_size=0.0)
# One usable row and one without a completion: loads, with one row skipped.
@example(
    case=({"type": "ebft_strided_structured.transform"}, [{"input": "q", "output": CODE[0]}, {"input": "q"}]),
    layout=(2, 2, 2, 1),
    val_set_size=0.0,
)
def test_random_rows_load_or_fail_cleanly(case, layout, val_set_size, tiny_tokenizer, rows_folder):
    entry, rows = case
    stride, context_length, generate_max_len, min_prefix = layout
    path = rows_folder / f"{uuid.uuid4().hex}.jsonl"
    path.write_text(jsonl(rows), encoding="utf-8")
    ebft = {
        **EBFT,
        "stride": stride,
        "context_length": context_length,
        "generate_max_len": generate_max_len,
        "min_completion_prefix": min_prefix,
    }
    cfg = parse_config(
        {
            "base_model": "m",
            "rl": "ebft",
            "ebft": ebft,
            "datasets": [{"path": str(path), **entry}],
            "sequence_len": 24,
            "val_set_size": val_set_size,
        }
    )
    kept = _kept_rows_or_clean_error(load_strided_datasets, cfg, tiny_tokenizer)
    # Whatever was kept is usable: token ids in the vocabulary, matching labels, within sequence_len.
    for row in kept:
        assert 0 < len(row["input_ids"]) <= cfg.sequence_len
        assert len(row["labels"]) == len(row["input_ids"])
        assert all(0 <= t < len(tiny_tokenizer) for t in row["input_ids"])


# Row shapes the structured transforms expect (None: rows that already hold prompt and ground_truth).
_STRUCTURED_PLAUSIBLE = {
    "ebft_opencode.transform": st.fixed_dictionaries({"input": _texts, "output": _texts}),
    "ebft_chat_multiturn.transform": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn, _user_turn, _assistant_turn).map(list)}
    ),
    "ebft_chat_multiturn.transform_all_turns": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn).map(list)}
    ),
    "ebft_reasoning.transform_split_thinking": st.fixed_dictionaries(
        {"messages": st.tuples(_user_turn, _assistant_turn).map(list) | _messages}
    ),
    None: st.fixed_dictionaries(
        {"prompt": _texts | _messages, "ground_truth": _texts},
        optional={"remaining_turns": _messages, "tests": _row_values},
    ),
}


@st.composite
def _structured_cases(draw) -> tuple[dict, list[dict]]:
    transform = draw(st.sampled_from(list(_STRUCTURED_PLAUSIBLE)))
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        row = dict(draw(_STRUCTURED_PLAUSIBLE[transform]))
        if draw(st.booleans()):  # damage: a field dropped or replaced
            key = draw(st.sampled_from(sorted(row) or ROW_FIELDS))
            if draw(st.booleans()):
                row.pop(key, None)
            else:
                row[key] = draw(_row_values)
        rows.append(row)
    return ({"type": transform} if transform else {}), rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_structured_cases(), val_set_size=st.sampled_from([0.0, 0.5, 1]))
def test_random_structured_rows_load_or_fail_cleanly(case, val_set_size, tiny_tokenizer, rows_folder):
    """Structured-mode loading: any row either becomes a usable prompt row or is a clean error/skip."""
    from ebft.data.structured import load_structured_datasets

    entry, rows = case
    path = rows_folder / f"{uuid.uuid4().hex}.jsonl"
    path.write_text(jsonl(rows), encoding="utf-8")
    cfg = parse_config(
        {
            "base_model": "m",
            "rl": "ebft",
            "ebft": {"mode": "structured"},
            "trl": {"num_generations": 2, "max_completion_length": 8},
            "micro_batch_size": 2,
            "datasets": [{"path": str(path), **entry}],
            "sequence_len": 48,
            "val_set_size": val_set_size,
        }
    )
    kept = _kept_rows_or_clean_error(load_structured_datasets, cfg, tiny_tokenizer)
    for row in kept:
        # Room for a whole completion after the prompt, and a ground truth that fits with it.
        assert 0 < len(row.prompt_ids) <= cfg.sequence_len - cfg.trl.max_completion_length
        assert len(row.prompt_ids) + len(row.gt_ids) <= cfg.sequence_len
        assert isinstance(row.ground_truth, str) and row.ground_truth
        assert all(0 <= t < len(tiny_tokenizer) for t in (*row.prompt_ids, *row.gt_ids))
