"""What every config module shares: the strict base model, a validator's list of problems, value display."""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Problems(ValueError):
    """Several problems found by one validator, as (key path relative to the model, reason)."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in items))
        self.items = items


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _scalar_kinds(annotation: Any) -> set:
    """The plain scalar types a field accepts (int, float, bool, None); ``object`` for anything else."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar_kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_scalar_kinds(arg) for arg in get_args(annotation)))
    if annotation in (int, float, bool, type(None)):
        return {annotation}
    return {object}


class Section(BaseModel):
    # Unknown keys are errors everywhere; NaN/inf never make sense in this config.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A count or a number given as true/false is a mistake, not 1 or 0 (pydantic's lax mode would take it)."""
        if not isinstance(value, bool):
            return value
        assert info.field_name is not None  # a field validator runs for one named field
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if kinds & {int, float} and not kinds & {bool, object}:
            raise ValueError(f"must be {'a number' if float in kinds else 'a whole number'}, not true or false")
        return value


def unknown_key_reason(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    if 0 < len(valid) <= 30:
        return "unknown key; valid keys here: " + ", ".join(valid)
    return "unknown key"
