"""What every config module shares: the strict base model, a validator's list of problems, value display."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict


class Problems(ValueError):
    """Several problems found by one validator, as (key path relative to the model, reason)."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in items))
        self.items = items


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Section(BaseModel):
    # Unknown keys are errors everywhere; NaN/inf never make sense in this config.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def unknown_key_reason(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    if 0 < len(valid) <= 30:
        return "unknown key; valid keys here: " + ", ".join(valid)
    return "unknown key"
