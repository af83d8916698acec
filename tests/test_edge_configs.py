"""Edge configurations that used to train silently wrong (issue 9): each is honoured or refused with the reason."""

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
# n = 1 with whitening (issue 9.3)


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
