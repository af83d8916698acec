"""Edge configurations that used to train silently wrong: each is honoured or refused with the reason."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ebft import rewards
from ebft.config import config_warnings, parse_config
from ebft.errors import ConfigError

STRIDED: dict[str, Any] = {
    "base_model": "tiny/model",
    "rl": "ebft",
    "ebft": {"mode": "strided"},
    "datasets": [{"path": "data.jsonl", "type": "ebft_pretrain.transform"}],
}


def _strided(**ebft: Any) -> dict[str, Any]:
    data = copy.deepcopy(STRIDED)
    data["ebft"].update(ebft)
    return data


# ----------------------------------------------------------------------------------------------
# n = 1 with whitening


def test_whitening_one_sample_carries_no_information():
    """Why the combination is refused: whitened against itself, one sample's alignment is +-2 whatever it is."""
    gen = torch.randn(6, 1, 10, generator=torch.Generator().manual_seed(0))
    gt = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    terms = rewards.reward_terms(gen, gt, alignment_coef=1.0, diversity_coef=0.0, use_whitening=True)
    # Feature space, n = 1: gen_w = x/|x| and gt_w = (<gt, x>/|x|^2) x, so cos = sign(<gt, x>).
    sign = torch.sign((gen[:, 0] * gt).sum(-1))
    torch.testing.assert_close(terms.alignment[:, 0], 2 * sign)


def test_one_sample_with_whitening_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as info:
        parse_config(_strided(n_samples_per_prompt=1, use_whitening=True))
    message = str(info.value)
    assert "ebft.use_whitening:" in message
    assert "n_samples_per_prompt >= 2" in message and "(got n_samples_per_prompt: 1)" in message


@pytest.mark.parametrize(("n", "whitening"), [(1, False), (2, True)])
def test_neighbours_of_the_refused_combination_still_load(n, whitening):
    cfg = parse_config(_strided(n_samples_per_prompt=n, use_whitening=whitening, advantage_estimator="reinforce"))
    assert (cfg.ebft.n_samples_per_prompt, cfg.ebft.use_whitening) == (n, whitening)
    assert not any(w.startswith("ebft.use_whitening") for w in config_warnings(cfg))


# ----------------------------------------------------------------------------------------------
# Token ids in the config are checked against the tokenizer when it loads


def _structured(model_dir, tmp_path, stop_ids) -> dict[str, Any]:
    return {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "trl": {"num_generations": 2, "max_completion_length": 32, "generation_kwargs": {"stop_token_ids": stop_ids}},
        "datasets": [{"path": str(tmp_path / "rows.jsonl"), "type": "ebft_opencode.transform"}],
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": 1,
        "output_dir": str(tmp_path / "run"),
    }


def test_stop_token_id_outside_the_vocabulary_stops_train_before_any_weights_load(
    tmp_path, tiny_model_dir, tiny_tokenizer, capsys
):
    import yaml

    from ebft.cli import main

    vocab = len(tiny_tokenizer)  # 384: the tiny BPE tokenizer's size
    path = tmp_path / "cfg.yaml"
    # A Llama-3 example's <|eot_id|> (128009) next to a valid id.
    path.write_text(yaml.safe_dump(_structured(tiny_model_dir, tmp_path, [tiny_tokenizer.eos_token_id, 128009])))
    (tmp_path / "rows.jsonl").write_text('{"input": "q", "output": "a"}\n')  # (a missing file is found first)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trl.generation_kwargs.stop_token_ids" in err
    assert "128009" in err and f"vocabulary of {vocab} tokens" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_stop_token_ids_inside_the_vocabulary_load(tmp_path, tiny_model_dir, tiny_tokenizer):
    from ebft.modeling.tokenizer import load_tokenizer

    last = len(tiny_tokenizer) - 1
    cfg = parse_config(_structured(tiny_model_dir, tmp_path, [0, last]))
    assert len(load_tokenizer(cfg)) == last + 1
    cfg = parse_config(_structured(tiny_model_dir, tmp_path, [last + 1]))
    with pytest.raises(ConfigError, match=rf"stop_token_ids: {last + 1} is not a token id"):
        load_tokenizer(cfg)
