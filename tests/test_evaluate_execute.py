"""``ebft evaluate --execute``: extracting code, running each row's unit tests, pass@k, the sandbox refusal,
and unit tests carried by the opencode transform and prompt rows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from evaluate_builders import G, evaluation_data, run_evaluate, write_config

from ebft.config import DatasetSpec
from ebft.data.structured import prompt_row
from ebft.data.transforms import ebft_opencode
from ebft.evaluate import execute as ev

# ---------------------------------------------------------------- --execute: pieces


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
        ("```\nx = 1\n```", "x = 1"),
        ("```py\nx = 2\n```\n```python\nx = 3\n```", "x = 2"),  # the first python block
        ('```json\n{"a": 1}\n```\ntext\n```python\nx = 4\n```', "x = 4"),  # other languages are skipped
        ("```python\ndef f():\n    return", "def f():\n    return"),  # cut at the cap: open fence to the end
        ("def f():\n    return 5", "def f():\n    return 5"),  # no fence: the whole text
    ],
)
def test_extract_code(text, code):
    assert ev.extract_code(text) == code


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
SUB_TESTS = ["assert sub(3, 1) == 2"]


def test_run_row_tests_and_pass_at_k_on_hand_made_completions():
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    a = ev.run_row_tests(
        [
            right,
            "def add(a, b):\n    return a * b",  # add(1, 2) == 2: an AssertionError
            "def add(a, b):\n    while True:\n        pass",
            "I would add them.",  # not code: a syntax error
        ],
        right,
        ADD_TESTS,
        timeout=1.0,
    )
    assert a == ev.RowExecution(("pass", "fail", "timeout", "error"), "pass")
    assert a.record() == {"passed": 1, "pass@1": 0.25, "pass@n": 1.0, "ground_truth_passed": True}

    # No completion passes, and the row's own ground truth fails its tests.
    b = ev.run_row_tests(["def sub(a, b):\n    return a + b", ""], "def sub(a, b):\n    return b - a", SUB_TESTS)
    assert b == ev.RowExecution(("fail", "error"), "fail")  # "" leaves sub undefined: a NameError

    c = ev.RowExecution(("pass", "pass", "fail", "fail"), "pass")
    assert c.record()["pass@1"] == 0.5 and c.record()["pass@n"] == 1.0

    metrics, counts = ev.execution_metrics([a, c])
    # pass@1: (1/4 + 2/4) / 2; pass@4: both rows have a passing completion; ground truths 2 of 2.
    assert metrics == {"pass@1": 0.375, "pass@n": 1.0, "ground_truth_pass_rate": 1.0}
    assert counts == {
        "rows_with_tests": 2,
        "completions": {"pass": 3, "fail": 3, "timeout": 1, "error": 1},
        "ground_truth": {"pass": 2, "fail": 0, "timeout": 0, "error": 0},
    }
    failing = ev.RowExecution(("fail", "fail", "error", "fail"), "fail")
    metrics, _ = ev.execution_metrics([a, failing])
    assert metrics == {"pass@1": 0.125, "pass@n": 0.5, "ground_truth_pass_rate": 0.5}


def test_execute_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    report = run_evaluate(config, tmp_path, "--split", "train", "--execute", "--exec-timeout", "2")
    m = report["metrics"]
    # The tiny model writes no working code; 3 of the 4 ground truths pass their tests (one row's are wrong).
    assert m["pass@1"] == 0.0 and m["pass@n"] == 0.0
    assert m["ground_truth_pass_rate"] == pytest.approx(3 / 4)
    execution = report["execution"]
    assert execution["rows_with_tests"] == 4 and execution["timeout_s"] == 2.0
    assert sum(execution["completions"].values()) == 4 * G and execution["completions"]["pass"] == 0
    assert execution["ground_truth"] == {"pass": 3, "fail": 1, "timeout": 0, "error": 0}
    with_tests = [d for d in report["documents"] if "tests" in d]
    assert [d["index"] for d in with_tests] == [0, 2, 3, 5]
    assert [d["ground_truth_passed"] for d in with_tests] == [True, True, True, False]
    assert [d["tests"] for d in with_tests] == [2, 1, 1, 1]
    assert all("passed" not in d for d in report["documents"] if d["index"] in (1, 4))
    out = capsys.readouterr().out
    assert "pass@1" in out and "unit tests of 4 rows" in out


def test_execute_errors(tiny_model_dir, tmp_path, capsys):
    from ebft.cli import main

    config = write_config(tmp_path, tiny_model_dir)
    # Rows 1 and 4 have no tests.
    assert main(["evaluate", str(config), "--split", "train[1:2]", "--execute"]) == 2
    err = capsys.readouterr().err
    assert "--execute needs rows with unit tests: a `tests` field" in err
    assert main(["evaluate", str(config), "--split", "train", "--execute", "--exec-timeout", "0"]) == 2
    assert "--exec-timeout must be > 0" in capsys.readouterr().err


def test_execute_refuses_without_bubblewrap(tmp_path, capsys, monkeypatch):
    """No sandbox, no execution, and no weaker fallback: one line with the install command, before any
    weights load (the base model here does not even exist)."""
    from ebft.cli import main
    from ebft.evaluate import sandbox

    config = write_config(tmp_path, tmp_path / "no-such-model")
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._checked_bwrap.cache_clear()
    try:
        assert main(["evaluate", str(config), "--split", "train", "--execute"]) == 2
    finally:
        sandbox._checked_bwrap.cache_clear()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --execute runs code only inside a bubblewrap sandbox")
    assert "apt-get install bubblewrap" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- tests fields


@pytest.mark.parametrize(
    ("value", "tests"),
    [
        ("['assert f(1) == 2', 'assert f(2) == 3']", ["assert f(1) == 2", "assert f(2) == 3"]),
        ("assert f(1) == 2\nassert f(2) == 3", ["assert f(1) == 2\nassert f(2) == 3"]),  # plain code: one test
        (["assert f(0) == 1"], ["assert f(0) == 1"]),
        (None, []),
        ("", [""]),  # kept; the loader drops blank tests
    ],
)
def test_opencode_unit_tests(value, tests):
    fn, _ = ebft_opencode.transform(SimpleNamespace())
    out = fn({"input": "q", "output": "a", "unit_tests": value})
    assert out["tests"] == tests


def test_opencode_without_unit_tests_has_no_tests_key_and_bad_ones_raise():
    fn, _ = ebft_opencode.transform(SimpleNamespace())
    assert "tests" not in fn({"input": "q", "output": "a"})
    with pytest.raises(ValueError, match="'unit_tests' must be a list of test strings"):
        fn({"input": "q", "output": "a", "unit_tests": "[1, 2]"})


def _limits():
    return {"sequence_len": 64, "max_completion_length": 8, "chat_template_kwargs": None, "source": "row 0"}


@pytest.mark.parametrize(
    ("tests", "expected"),
    [
        ("assert True", ("assert True",)),
        (["assert 1", "  ", "assert 2"], ("assert 1", "assert 2")),  # a blank test would test nothing
        (None, ()),
    ],
)
def test_prompt_row_tests(tiny_tokenizer, tests, expected):
    row = prompt_row({"prompt": "q", "ground_truth": "a", "tests": tests}, tiny_tokenizer, **_limits())
    assert row.tests == expected


@pytest.mark.parametrize("tests", [5, ["assert 1", 2], {"a": "assert 1"}])
def test_prompt_row_rejects_bad_tests(tiny_tokenizer, tests):
    with pytest.raises(ValueError, match="tests must be a string or a list of strings"):
        prompt_row({"prompt": "q", "ground_truth": "a", "tests": tests}, tiny_tokenizer, **_limits())


def test_loader_reads_tests_and_skips_a_row_with_bad_unit_tests(tiny_model_dir, tmp_path):
    rows = [
        {"input": "q1", "output": "a1", "unit_tests": "['assert 1']"},
        {"input": "q2", "output": "a2", "unit_tests": "[1, 2]"},
        {"input": "q3", "output": "a3", "unit_tests": ""},
    ]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path, tiny_model_dir)
    spec = {"path": str(data), "type": "ebft_opencode.transform"}
    loaded = evaluation_data(config, datasets=[DatasetSpec(**spec)])
    assert [(r.ground_truth, r.tests) for r in loaded.train] == [("a1", ("assert 1",)), ("a3", ())]
    assert loaded.skipped == 1
    assert loaded.first_skip_reason.startswith(
        f"dataset '{data}', row 1: transform raised ValueError: 'unit_tests' must be a list of test strings"
    )


def test_the_training_sample_is_bounded_by_default(tiny_model_dir, tmp_path):
    from ebft.config import load_config
    from ebft.evaluate.load import TRAIN_SAMPLE_DOCS, held_out_plan

    cfg = load_config(write_config(tmp_path, tiny_model_dir))
    assert TRAIN_SAMPLE_DOCS == 200  # the default the README and the guide document
    assert held_out_plan(cfg, None, None)[1] == TRAIN_SAMPLE_DOCS
    assert held_out_plan(cfg, None, 5)[1] == 5
    # Held-out rows (a split, or val_set_size) are read in full unless --max-docs says otherwise.
    assert held_out_plan(cfg, "test", None)[1] is None
    assert held_out_plan(cfg.model_copy(update={"val_set_size": 2}), None, None)[1] is None
