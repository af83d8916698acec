"""Which mode trains a config: ``ebft.mode`` names the strided or the structured runner. (SFT, the quickstart's
baseline, is passed to the loop explicitly: ``ebft.sft.runner.mode()``.)"""

from __future__ import annotations

from ebft.config import TrainConfig
from ebft.strided import runner as strided
from ebft.structured import runner as structured
from ebft.train.runner import Mode

MODES: dict[str, Mode] = {"strided": strided.MODE, "structured": structured.MODE}


def mode_of(cfg: TrainConfig) -> Mode:
    """The mode ``cfg.ebft.mode`` names."""
    return MODES[cfg.ebft.mode]
