"""``ebft_opencode.transform``: ``{input, output}`` rows as structured-mode prompt/ground-truth pairs.

``input`` becomes a one-message chat prompt (the loader renders it with the chat template) and
``output`` the reference answer. A row whose ``input`` or ``output`` is missing, not a string or
empty raises ValueError naming the field, so the loader skips it with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping


def transform(cfg, **kwargs):
    return to_prompt_row, {"remove_columns": "__all__"}


def to_prompt_row(example: Mapping, tokenizer=None) -> dict:
    return {
        "prompt": [{"role": "user", "content": required_text(example, "input")}],
        "ground_truth": required_text(example, "output"),
    }


def required_text(example: Mapping, field: str) -> str:
    value = example.get(field)
    if not isinstance(value, str) or not value:
        got = "missing" if value is None else ("empty" if value == "" else f"a {type(value).__name__}")
        raise ValueError(f"'{field}' must be a non-empty string; it is {got}")
    return value
