"""ebft.config: command-line overrides (YAML values, order, whole list items, validation, syntax errors)."""

from __future__ import annotations

import pytest
from config_loading import config, error, load

from ebft.config import DatasetSpec, parse_config


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load(
        tmp_path,
        config(),
        (
            "--ebft.stride=4",
            "--max_steps=10",
            "--learning_rate=3e-5",  # YAML 1.1 reads 3e-5 as a string; it must still become a float
            "--ebft.use_whitening=true",
            "--datasets.0.path=other.jsonl",
            "--ebft.feature_layers=[0.5]",
            "--ebft.context-length=16",  # axolotl's CLI spelling
            "--trl.num_generations=8",  # creates the missing section
            "--wandb_project=",  # empty = null
        ),
    )
    assert (cfg.ebft.stride, cfg.max_steps, cfg.learning_rate, cfg.ebft.use_whitening) == (4, 10, 3e-5, True)
    assert cfg.datasets[0].path == "other.jsonl" and cfg.ebft.feature_layers == [0.5]
    assert cfg.ebft.context_length == 16 and cfg.trl.num_generations == 8 and cfg.wandb_project is None


def test_later_override_wins(tmp_path):
    assert load(tmp_path, config(), ("--ebft.stride=4", "--ebft.stride=2")).ebft.stride == 2


def test_override_can_replace_a_whole_list_item(tmp_path):
    cfg = load(tmp_path, config(), ("--datasets.0={path: b.jsonl, type: ebft_pretrain.transform, pack: false}",))
    assert cfg.datasets[0] == DatasetSpec(path="b.jsonl", type="ebft_pretrain.transform", pack=False)


def test_unknown_override_key_is_an_unknown_key(tmp_path):
    message = error(tmp_path, config(), ("--ebft.strid=4",))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'} (with overrides --ebft.strid=4): invalid config")
    assert "  ebft.strid: unknown key, did you mean 'stride'?" in message.splitlines()


def test_override_value_is_validated(tmp_path):
    assert "  ebft.stride: must be >= 1 (got 0)" in error(tmp_path, config(), ("--ebft.stride=0",)).splitlines()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("ebft.stride=4", "expected --key.path=value"),
        ("--ebft.stride", "expected --key.path=value"),
        ("--ebft..stride=4", "expected --key.path=value"),
        ("--=4", "expected --key.path=value"),
        ("--datasets.1.path=x", "datasets.1: no such list item (the list has 1 item, indices from 0)"),
        ("--datasets.first.path=x", "datasets.first: no such list item"),
        ("--base_model.revision=main", "base_model is a single value, not a section"),
        ("--ebft.feature_layers=[0.5", "malformed YAML"),
    ],
)
def test_bad_override_syntax(tmp_path, override, fragment):
    message = error(tmp_path, config(), (override,))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}: override {override!r}")
    assert fragment in message


def test_overrides_do_not_touch_the_callers_mapping():
    data = config()
    parse_config(data, overrides=("--ebft.stride=2", "--datasets.0.path=x"))
    assert data == config()
