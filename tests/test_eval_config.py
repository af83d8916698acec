"""The keys of evaluation during training, early stopping and the best model: honoured instead
of ignored, checked before anything loads, and what follows from them (interval, metric, direction)."""

from __future__ import annotations

import pytest
import yaml

from ebft.config import IGNORED_AXOLOTL_KEYS, config_warnings, dump_config, parse_config
from ebft.config.evaluation import best_metric, eval_interval, evaluates, metric_name
from ebft.errors import ConfigError

STRIDED = {
    "base_model": "m",
    "rl": "ebft",
    "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 4},
    "datasets": [{"path": "d.jsonl", "type": "ebft_pretrain.transform"}],
    "sequence_len": 64,
}
STRUCTURED = {
    "base_model": "m",
    "rl": "ebft",
    "ebft": {"mode": "structured"},
    "trl": {"num_generations": 2, "max_completion_length": 16},
    "datasets": [{"path": "p.jsonl", "type": "ebft_opencode.transform"}],
    "sequence_len": 64,
    "micro_batch_size": 2,
}
HELD_OUT = {"val_set_size": 0.1}


def _cfg(base=STRIDED, **keys):
    return parse_config({**base, **keys})


def _problem(base=STRIDED, **keys) -> str:
    with pytest.raises(ConfigError) as err:
        _cfg(base, **keys)
    return str(err.value)


def test_the_keys_are_honoured_and_no_longer_ignored():
    for key in ("eval_steps", "evals_per_epoch", "early_stopping_patience"):
        assert key not in IGNORED_AXOLOTL_KEYS
    cfg = _cfg(
        **HELD_OUT,
        eval_steps=10,
        eval_max_docs=50,
        eval_batch_size=4,
        early_stopping_patience=3,
        metric_for_best_model="eval_ce_loss",
        load_best_model_at_end=True,
        save_steps=20,
    )
    assert config_warnings(cfg) == []
    assert evaluates(cfg) and cfg.metric_for_best_model == "eval/ce_loss"
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg  # the dump reloads to the same run


def test_axolotl_spells_off_as_empty():
    cfg = _cfg(load_best_model_at_end=None, eval_steps=None, early_stopping_patience=None)
    assert cfg.load_best_model_at_end is False and not evaluates(cfg)


@pytest.mark.parametrize(
    ("written", "logged"),
    [("eval/cfm_loss", "eval/cfm_loss"), ("eval_cfm_loss", "eval/cfm_loss"), ("cfm_loss", "eval/cfm_loss")],
)
def test_metric_names_in_transformers_spelling(written, logged):
    assert metric_name(written) == logged


@pytest.mark.parametrize(
    ("metric", "greater", "expected"),
    [
        (None, None, ("eval/cfm_loss", False)),  # the default: the feature-matching loss, lower is better
        ("ce_loss", None, ("eval/ce_loss", False)),
        ("eval_perplexity", None, ("eval/perplexity", False)),
        ("eval/diversity", None, ("eval/diversity", False)),  # similarity between samples: lower
        ("reward", None, ("eval/reward", True)),
        ("alignment_best_of_n", None, ("eval/alignment_best_of_n", True)),
        ("ce_loss", True, ("eval/ce_loss", True)),  # greater_is_better wins over the metric's own direction
    ],
)
def test_the_compared_metric_and_its_direction(metric, greater, expected):
    cfg = _cfg(
        **HELD_OUT, eval_steps=2, early_stopping_patience=1, metric_for_best_model=metric, greater_is_better=greater
    )
    chosen = best_metric(cfg)
    assert (chosen.name, chosen.greater_is_better) == expected


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        ({"eval_steps": 2, "evals_per_epoch": 2}, "evals_per_epoch: set eval_steps or evals_per_epoch, not both"),
        (
            {"test_datasets": [{"path": "t.jsonl", "type": "ebft_pretrain.transform"}]},
            "test_datasets: set test_datasets or val_set_size, not both (got val_set_size=0.1)",
        ),
        ({"eval_steps": 2.5}, "eval_steps: a whole number of steps (>= 1) or a fraction of the run in (0, 1)"),
        ({"eval_steps": 0}, "eval_steps"),
        ({"eval_steps": 2, "eval_strategy": "no"}, "eval_strategy: no conflicts with eval_steps"),
        ({"evals_per_epoch": 2, "eval_strategy": "epoch"}, "eval_strategy: epoch conflicts with evals_per_epoch"),
        ({"eval_strategy": "steps"}, "eval_strategy: steps needs eval_steps"),
        (
            {"early_stopping_patience": 2},
            "early_stopping_patience: compares evaluations during training, which need eval_steps",
        ),
        ({"load_best_model_at_end": True, "eval_steps": 2}, "load_best_model_at_end: needs checkpoints to choose from"),
        (
            {"load_best_model_at_end": True, "eval_steps": 2, "save_steps": 3},
            "save_steps: with load_best_model_at_end, a multiple of the evaluation interval (2 steps here)",
        ),
        (
            {"early_stopping_patience": 2, "eval_steps": 2, "metric_for_best_model": "eval_ce_los"},
            "metric_for_best_model: eval/ce_los is not an evaluation metric; did you mean eval/ce_loss?",
        ),
        (
            # transformers' default eval_loss names nothing here: the table is listed
            {"early_stopping_patience": 2, "eval_steps": 2, "metric_for_best_model": "eval_loss"},
            "a strided run evaluates eval/cfm_loss, eval/alignment,",
        ),
        (
            {"early_stopping_patience": 2, "eval_steps": 2, "ebft": {**STRIDED["ebft"], "n_samples_per_prompt": 1}},
            "metric_for_best_model: eval/cfm_loss needs ebft.n_samples_per_prompt >= 2",
        ),
        ({"eval_max_docs": 0}, "eval_max_docs"),
    ],
)
def test_problems_are_one_line_each_before_anything_loads(keys, line):
    assert line in _problem(**{**HELD_OUT, **keys})


def test_early_stopping_needs_held_out_rows():
    message = _problem(eval_steps=2, early_stopping_patience=1)
    assert "early_stopping_patience: compares evaluations during training, which need held-out rows" in message


def test_structured_metrics_and_test_datasets():
    test = [{"path": "t.jsonl", "type": "ebft_opencode.transform", "split": "test"}]
    cfg = _cfg(
        STRUCTURED,
        test_datasets=test,
        eval_steps=1,
        early_stopping_patience=1,
        greater_is_better=False,
        metric_for_best_model="completion_length",
    )
    assert evaluates(cfg) and best_metric(cfg).name == "eval/completion_length"
    # A metric that is neither a loss nor a score needs its direction.
    message = _problem(
        STRUCTURED,
        test_datasets=test,
        eval_steps=1,
        early_stopping_patience=1,
        metric_for_best_model="completion_length",
    )
    assert "greater_is_better: eval/completion_length is neither a loss nor a score" in message
    wrong = [{"path": "t.jsonl", "type": "ebft_pretrain.transform"}]
    assert "test_datasets.0.type: 'ebft_pretrain.transform' produces strided-mode rows" in _problem(
        STRUCTURED, test_datasets=wrong
    )


def test_warnings_for_keys_that_change_nothing():
    assert config_warnings(_cfg(eval_steps=5)) == [
        "eval_steps: no evaluation during training: there are no held-out rows (val_set_size is 0 and no "
        "test_datasets); set one of them"
    ]
    assert config_warnings(_cfg(**HELD_OUT, metric_for_best_model="ce_loss")) == [
        "metric_for_best_model: has no effect without early_stopping_patience or load_best_model_at_end"
    ]
    assert config_warnings(_cfg(**HELD_OUT, eval_on_start=False)) == [
        "eval_on_start: has no effect without evaluation during training (eval_steps and held-out rows)"
    ]


@pytest.mark.parametrize(
    ("keys", "total", "interval"),
    [
        ({"eval_steps": 5}, 12, 5),
        ({"eval_steps": 0.25}, 10, 3),  # a quarter of 10 steps, rounded up as transformers does: ceil(2.5)
        ({"evals_per_epoch": 2}, 9, 5),  # 9 steps / (2 evals x 1 epoch) = 4.5 -> 5 (axolotl's rounding)
        ({"evals_per_epoch": 2, "num_epochs": 3}, 12, 2),  # 12 / (2 x 3)
        ({"eval_strategy": "epoch", "num_epochs": 2}, 10, 5),  # once per epoch: 10 / (1 x 2)
        ({"eval_steps": 50}, 10, 50),  # past the run's end: only the last step is evaluated
        ({"eval_strategy": "no"}, 10, None),
    ],
)
def test_eval_interval(keys, total, interval):
    assert eval_interval(_cfg(**HELD_OUT, **keys), total) == interval


def test_no_held_out_rows_no_interval():
    assert eval_interval(_cfg(eval_steps=5), 10) is None
