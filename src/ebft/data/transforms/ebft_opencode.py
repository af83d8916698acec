"""``ebft_opencode.transform``: ``{input, output}`` rows as structured-mode prompt/ground-truth pairs.

``input`` becomes a one-message chat prompt (the loader renders it with the chat template) and
``output`` the reference answer. A row whose ``input`` or ``output`` is missing, not a string or
empty raises ValueError naming the field, so the loader skips it with that reason.

Where the dataset has OpenCodeInstruct's ``unit_tests`` column, it becomes the row's ``tests`` (a list
of test statements, for ``ebft evaluate --execute``) on every row, an empty list where a row has none.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from ebft.config import TrainConfig


def transform(cfg: TrainConfig, **kwargs):
    return to_prompt_row, {"remove_columns": "__all__"}


def to_prompt_row(example: Mapping, tokenizer=None) -> dict:
    row = {
        "prompt": [{"role": "user", "content": required_text(example, "input")}],
        "ground_truth": required_text(example, "output"),
    }
    if "unit_tests" in example:
        row["tests"] = unit_tests(example["unit_tests"])
    return row


def required_text(example: Mapping, field: str) -> str:
    value = example.get(field)
    if not isinstance(value, str) or not value:
        got = "missing" if value is None else ("empty" if value == "" else f"a {type(value).__name__}")
        raise ValueError(f"'{field}' must be a non-empty string; it is {got}")
    return value


def unit_tests(value) -> list[str]:
    """The tests in a ``unit_tests`` value; ValueError when it holds something else.

    OpenCodeInstruct stores a Python list literal of assert statements as a string
    (``"['assert f(1) == 2', ...]"``); it is parsed. A string that is not a literal (plain test code)
    is one test; a list of strings is taken as it is; None is no tests.
    """
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"'unit_tests' must be a list of test strings (or a string holding one); got {value!r:.80}")
    return value
