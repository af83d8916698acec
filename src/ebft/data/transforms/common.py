"""Small helpers shared by the built-in transforms."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def first_present(row: Mapping, names: Iterable[str], what: str) -> str:
    """The first of ``names`` that ``row`` has with a non-null value; ValueError naming ``what`` if none."""
    names = tuple(names)
    for name in names:
        if row.get(name) is not None:
            return name
    present = sorted(name for name, value in row.items() if value is not None)
    raise ValueError(f"no {what} column: expected one of {', '.join(names)}; the row has {present}")


def require_tokenizer(tokenizer, transform: str):
    """Built-in transforms tokenize, so they cannot run without a tokenizer."""
    if tokenizer is None:
        raise ValueError(f"{transform} needs a tokenizer")
    return tokenizer


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one (special_tokens: {eos_token: ...})")
    return int(tokenizer.eos_token_id)
