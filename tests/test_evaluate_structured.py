"""``ebft evaluate`` on structured configs: metrics against independent recomputations with the plain HF
model, row selection, seeding, the CLI, and ``--execute`` (code extraction, pass counting, tests fields)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from ebft.config import DatasetSpec
from ebft.data.structured import load_structured_datasets, prompt_row
from ebft.data.transforms import ebft_opencode
from ebft.evaluate import execute as ev
from ebft.evaluate.output import METRICS

G = 3  # completions per prompt
CAP = 8  # trl.max_completion_length; the adaptive cap never exceeds it


def _code_rows() -> list[dict]:
    """OpenCodeInstruct-style rows: 3 whose ground truth passes its tests, 1 whose tests are wrong, and 2 without
    tests. Ground truths of different lengths, so a row can be recognised by its token count."""

    def fenced(body: str) -> str:
        return f"```python\n{body}\n```"

    return [
        {
            "input": "Write add(a, b) that returns the sum.",
            "output": fenced("def add(a, b):\n    # the sum of a and b\n    return a + b"),
            "unit_tests": "['assert add(1, 2) == 3', 'assert add(-1, 1) == 0']",
        },
        {"input": "Say hello.", "output": "hello", "unit_tests": ""},
        {
            "input": "Write neg(x).",
            "output": "def neg(x):\n    return -x",
            "unit_tests": "assert neg(2) == -2",
        },
        {
            "input": "Write double(x) that doubles a number.",
            "output": fenced("def double(x):\n    return 2 * x\n\n\nprint(double(4))"),
            "unit_tests": "['assert double(3) == 6']",
        },
        {"input": "Name a colour.", "output": "deep blue", "unit_tests": ""},
        {
            "input": "Write sub(a, b).",
            "output": fenced("def sub(a, b):\n    return a + b"),
            "unit_tests": "['assert sub(3, 1) == 2']",  # the ground truth is wrong: its tests fail
        },
    ]


def _write_config(tmp_path: Path, model_dir: Path, *, ebft=None, trl=None, **top) -> Path:
    data = tmp_path / "code.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in _code_rows()))
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "use_whitening": False, **(ebft or {})},
        "trl": {"num_generations": G, "max_completion_length": CAP, "temperature": 1.0, **(trl or {})},
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "micro_batch_size": 2 * G,  # two prompts per scoring batch
        "bf16": False,
        "seed": 3,
        "output_dir": str(tmp_path / "out"),
        **top,
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _evaluate(config: Path, tmp_path: Path, *extra: str) -> dict:
    from ebft.cli import main

    output = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    assert main(["evaluate", str(config), "--output", str(output), *extra]) == 0
    return json.loads(output.read_text())


def _data(config: Path, **update):
    """The config's prompt rows as the training loader gives them (with ``update`` applied to the config)."""
    from ebft.config import load_config
    from ebft.modeling.tokenizer import load_tokenizer

    cfg = load_config(config).model_copy(update=update)
    return load_structured_datasets(cfg, load_tokenizer(cfg))


@pytest.fixture(scope="module")
def base_eval(tiny_model_dir, tmp_path_factory):
    # main() configures the ebft logger before any test's own restore fixture saved it: undo that here,
    # or later modules' caplog would see nothing.
    logger = logging.getLogger("ebft")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    tmp = tmp_path_factory.mktemp("eval-structured")
    config = _write_config(tmp, tiny_model_dir)
    yield tmp, config, _evaluate(config, tmp, "--split", "train")
    logger.handlers[:], logger.propagate, logger.level = saved


def _hf_model(model_dir):
    """The plain HF model, on the device evaluation uses (so that regenerated samples draw the same numbers)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval().to(device)


# ---------------------------------------------------------------- metrics


def test_structured_report_shape_and_internal_identities(base_eval):
    _tmp, _config, report = base_eval
    m = report["metrics"]
    keys = {key for key, _label, _better in METRICS} | {"completion_length", "truncated_fraction"}
    assert set(m) == keys  # no pass@ keys without --execute
    assert all(math.isfinite(v) for v in m.values())
    assert report["data"] == {
        "source": "datasets at split 'train'",
        "prompts": 6,
        "completions": 6 * G,
        "tokens": report["data"]["tokens"],
        "answer_tokens": report["data"]["answer_tokens"],
    }
    assert report["settings"]["rollout_backend"] == "transformers generate"
    assert "execution" not in report and "per completion" in report["notes"][0]
    docs = report["documents"]
    assert [d["index"] for d in docs] == list(range(6))
    for d in docs:
        # Unit features without whitening: CFM = 1 - mean(a - d/2), per prompt and overall.
        assert d["cfm_loss"] == pytest.approx(1 - (d["alignment"] - d["diversity"] / 2), abs=1e-5)
        assert d["alignment_best_of_n"] >= d["alignment"] - 1e-6 and d["reward_best_of_n"] >= d["reward"] - 1e-6
        assert 1 <= d["completion_length"] <= CAP and 0 <= d["truncated_fraction"] <= 1
        assert d["perplexity"] == pytest.approx(math.exp(d["ce_loss"]))
    # Overall values are means over all completions (3 per prompt), best-of-n and CFM over prompts.
    assert m["alignment"] == pytest.approx(sum(d["alignment"] for d in docs) / 6)
    assert m["cfm_loss"] == pytest.approx(sum(d["cfm_loss"] for d in docs) / 6)


def test_ce_matches_a_hand_teacher_forced_computation(base_eval, tiny_model_dir, tiny_tokenizer):
    """CE over prompt + ground truth + EOS, and over ground truth + EOS, with plain HF forwards."""
    _tmp, config, report = base_eval
    model = _hf_model(tiny_model_dir)
    rows = _data(config).train
    nll = count = answer_nll = answer_count = 0.0
    with torch.no_grad():
        for d in report["documents"]:
            row = rows[d["index"]]
            ids = torch.tensor([*row.prompt_ids, *row.gt_ids, tiny_tokenizer.eos_token_id], device=model.device)[None]
            labels = ids.clone()
            labels[0, : len(row.prompt_ids)] = -100
            targets = ids.shape[1] - 1
            answers = len(row.gt_ids) + 1
            row_nll = float(model(input_ids=ids, labels=ids).loss) * targets
            row_answer = float(model(input_ids=ids, labels=labels).loss) * answers
            # The tiny model is near uniform (CE ~ ln 384), so different token sets differ by only ~1e-4
            # relative: compare tightly (float32 forwards, batched or not, agree to ~1e-6).
            assert d["ce_loss"] == pytest.approx(row_nll / targets, rel=2e-5)
            assert d["answer_ce_loss"] == pytest.approx(row_answer / answers, rel=2e-5)
            nll, count = nll + row_nll, count + targets
            answer_nll, answer_count = answer_nll + row_answer, answer_count + answers
    assert report["data"]["tokens"] == count and report["data"]["answer_tokens"] == answer_count
    assert report["metrics"]["ce_loss"] == pytest.approx(nll / count, rel=2e-5)
    assert report["metrics"]["answer_ce_loss"] == pytest.approx(answer_nll / answer_count, rel=2e-5)


def _oracle_features(model, ids: list[int]) -> torch.Tensor:
    """Default feature settings by hand: hidden states 1, 2, 3 of the 4-layer model (fractions 0.25, 0.5,
    0.75), each L2-normalised at the last token, concatenated."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
    return torch.cat([torch.nn.functional.normalize(hidden[i][0, -1], dim=-1) for i in (1, 2, 3)]).cpu()


def test_alignment_reward_and_cfm_match_an_independent_recomputation(base_eval, tiny_model_dir, tiny_tokenizer):
    """Regenerate one prompt's completions with the evaluation's seed, embed them with plain HF forwards,
    and recompute alignment, diversity, reward, best-of-n and the unbiased CFM from their definitions."""
    from ebft.config import load_config
    from ebft.structured.hf import HFGenerate
    from ebft.structured.rollout import Sampling, mix_seed

    _tmp, config, report = base_eval
    cfg = load_config(config)
    model = _hf_model(tiny_model_dir)
    rows = _data(config).train
    eos = tiny_tokenizer.eos_token_id
    sampler = HFGenerate(model, sampling=Sampling.from_trl(cfg.trl, eos), pad_token_id=tiny_tokenizer.pad_token_id)
    for d in report["documents"][:2]:
        row = rows[d["index"]]
        (completions,) = sampler.generate([list(row.prompt_ids)], G, [CAP], [mix_seed(cfg.seed, -1, d["index"])])
        phi = torch.stack(
            [_oracle_features(model, [*row.prompt_ids, *(c.ids[:-1] if c.finished else c.ids)]) for c in completions]
        )
        y = _oracle_features(model, [*row.prompt_ids, *row.gt_ids])
        u, v = torch.nn.functional.normalize(phi, dim=-1), torch.nn.functional.normalize(y, dim=-1)
        align = 2 * (u @ v)  # [G]
        gram = u @ u.T
        off = gram.sum(1) - gram.diagonal()
        divers = 2 / (G - 1) * off
        reward = align - divers
        # ||E phi - y||^2 with E||phi||^2 replaced by the mean over ordered pairs i != j.
        cfm = float(off.sum() / (G * (G - 1)) - 2 * (u @ v).mean() + 1)
        assert d["alignment"] == pytest.approx(float(align.mean()), abs=1e-4)
        assert d["diversity"] == pytest.approx(float(divers.mean()), abs=1e-4)
        assert d["reward"] == pytest.approx(float(reward.mean()), abs=1e-4)
        assert d["alignment_best_of_n"] == pytest.approx(float(align.max()), abs=1e-4)
        assert d["reward_best_of_n"] == pytest.approx(float(reward.max()), abs=1e-4)
        assert d["cfm_loss"] == pytest.approx(cfm, abs=1e-4)
        lengths = [len(c.ids) for c in completions]
        assert d["completion_length"] == pytest.approx(sum(lengths) / G)
        assert d["truncated_fraction"] == pytest.approx(sum(not c.finished for c in completions) / G)


def test_two_evaluations_are_identical_and_a_subset_keeps_each_rows_numbers(base_eval, tiny_model_dir, tmp_path):
    _tmp, config, first = base_eval
    again = _evaluate(config, tmp_path, "--split", "train")
    assert again["metrics"] == first["metrics"]
    assert again["documents"] == first["documents"]
    # --max-docs spreads over the set; rows are seeded by their held-out index, so their rollouts do not
    # change. Scores agree up to batching noise (rows are scored two at a time, with other partners here).
    subset = _evaluate(config, tmp_path, "--split", "train", "--max-docs", "3")
    assert [d["index"] for d in subset["documents"]] == [0, 2, 4]
    for d in subset["documents"]:
        full = first["documents"][d["index"]]
        assert d["completion_length"] == full["completion_length"]
        assert d["reward"] == pytest.approx(full["reward"], abs=1e-4)


def test_whitening_changes_the_reward_terms_but_not_the_cfm(base_eval, tiny_model_dir, tmp_path):
    _tmp, _config, plain = base_eval
    whitened = _evaluate(_write_config(tmp_path, tiny_model_dir, ebft={"use_whitening": True}), tmp_path)
    assert whitened["metrics"]["cfm_loss"] == pytest.approx(plain["metrics"]["cfm_loss"], abs=1e-5)
    assert whitened["metrics"]["alignment"] != pytest.approx(plain["metrics"]["alignment"], abs=1e-3)


# ---------------------------------------------------------------- row selection


def _gt_lengths(rows) -> list[int]:
    return [len(r.gt_ids) for r in rows]


def test_split_selects_that_split_of_every_dataset(tiny_model_dir, tmp_path):
    config = _write_config(tmp_path, tiny_model_dir)
    every = _data(config).train
    assert len(set(_gt_lengths(every))) == len(every)  # rows are told apart by ground-truth length
    report = _evaluate(config, tmp_path, "--split", "train[3:]")
    assert report["data"]["source"] == "datasets at split 'train[3:]'"
    assert [d["ground_truth_tokens"] for d in report["documents"]] == _gt_lengths(every[3:])


def test_val_set_size_evaluates_the_rows_training_held_out(tiny_model_dir, tmp_path):
    config = _write_config(tmp_path, tiny_model_dir, val_set_size=2)
    data = _data(config)
    report = _evaluate(config, tmp_path)
    assert report["data"]["source"] == "validation rows (val_set_size=2, seed 3)"
    assert [d["ground_truth_tokens"] for d in report["documents"]] == _gt_lengths(data.val)
    assert len(data.val) == 2 and set(_gt_lengths(data.train)).isdisjoint(_gt_lengths(data.val))


def test_without_split_or_validation_rows_it_says_so_and_samples_the_training_rows(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from ebft.evaluate import run

    monkeypatch.setattr(run, "_said", set())  # each line is said once per process; this test reads them
    config = _write_config(tmp_path, tiny_model_dir)
    report = _evaluate(config, tmp_path, "--max-docs", "2")
    # The CLI logs through rich, which wraps long lines.
    err = " ".join(capsys.readouterr().err.split())
    # The first line says which rows, before any loading.
    assert err.startswith("INFO evaluating on a sample of the training rows (at most 2 documents, spread evenly; ")
    assert "evaluating 2 of the 6 training rows (split train)" in err
    assert report["data"]["source"] == "training rows (split train)"
    assert [d["index"] for d in report["documents"]] == [0, 3]


def test_vllm_config_is_evaluated_with_transformers_generate(tiny_model_dir, tmp_path):
    config = _write_config(
        tmp_path,
        tiny_model_dir,
        trl={"use_vllm": True, "vllm_lora_sync": True},
        adapter="lora",
        lora_target_linear=True,
    )
    report = _evaluate(config, tmp_path, "--split", "train", "--max-docs", "1")
    assert report["settings"]["rollout_backend"] == "transformers generate"
    assert any("transformers generate" in note for note in report["notes"])


# ---------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_json(tiny_model_dir, tmp_path, capsys):
    from ebft.cli import main

    config = _write_config(tmp_path, tiny_model_dir)
    output = tmp_path / "report.json"
    assert main(["evaluate", str(config), "--split", "train", "--max-docs", "2", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "ebft evaluate" in out and "2 prompts, 6 completions" in out
    assert "completion length" in out and "pass@1" not in out
    report = json.loads(output.read_text())
    assert len(report["documents"]) == 2 and report["data"]["prompts"] == 2


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
    config = _write_config(tmp_path, tiny_model_dir)
    report = _evaluate(config, tmp_path, "--split", "train", "--execute", "--exec-timeout", "2")
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

    config = _write_config(tmp_path, tiny_model_dir)
    # Rows 1 and 4 have no tests.
    assert main(["evaluate", str(config), "--split", "train[1:2]", "--execute"]) == 2
    err = capsys.readouterr().err
    assert "--execute needs rows with unit tests: a `tests` field" in err
    assert main(["evaluate", str(config), "--split", "train", "--execute", "--exec-timeout", "0"]) == 2
    assert "--exec-timeout must be > 0" in capsys.readouterr().err


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
    config = _write_config(tmp_path, tiny_model_dir)
    spec = {"path": str(data), "type": "ebft_opencode.transform"}
    loaded = _data(config, datasets=[DatasetSpec(**spec)])
    assert [(r.ground_truth, r.tests) for r in loaded.train] == [("a1", ("assert 1",)), ("a3", ())]
    assert loaded.skipped == 1
    assert loaded.first_skip_reason.startswith(
        f"dataset '{data}', row 1: transform raised ValueError: 'unit_tests' must be a list of test strings"
    )


def test_the_training_sample_is_bounded_by_default(tiny_model_dir, tmp_path):
    from ebft.config import load_config
    from ebft.evaluate.load import TRAIN_SAMPLE_DOCS, held_out_plan

    cfg = load_config(_write_config(tmp_path, tiny_model_dir))
    assert TRAIN_SAMPLE_DOCS == 200  # the default the README and the guide document
    assert held_out_plan(cfg, None, None)[1] == TRAIN_SAMPLE_DOCS
    assert held_out_plan(cfg, None, 5)[1] == 5
    # Held-out rows (a split, or val_set_size) are read in full unless --max-docs says otherwise.
    assert held_out_plan(cfg, "test", None)[1] is None
    assert held_out_plan(cfg.model_copy(update={"val_set_size": 2}), None, None)[1] is None
