"""Apply a transform to a dataset without letting one bad row abort the whole map.

Every output row carries the token fields of strided mode plus two bookkeeping columns: ``ERROR``
(why the row cannot be used, null when it can) and ``ROW`` (the source row it came from, -1 when a
batched transform changed the number of rows, so the source is unknown). Unusable rows stay in the
output with empty tokens; the loader counts, reports and drops them in one place.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Mapping, Sequence

from ebft.data.fingerprint import source_digest, tokenizer_digest
from ebft.strided.anchors import first_anchor, num_blocks

ERROR = "_ebft_error"
ROW = "_ebft_row"
TOKEN_COLUMNS = ("input_ids", "labels", "prompt_length")
IGNORE_INDEX = -100


def token_features():
    """Arrow schema of a token row; explicit so that datasets from different sources concatenate."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "prompt_length": Value("int64"),
            ERROR: Value("string"),
            ROW: Value("int64"),
        }
    )


def columns_to_remove(remove_columns, column_names: Sequence[str]) -> list[str]:
    """``"__all__"`` -> every column; a name or list -> those that exist; None -> none."""
    if remove_columns is None:
        return []
    if remove_columns == "__all__":
        return list(column_names)
    if isinstance(remove_columns, str):
        remove_columns = [remove_columns]
    wanted = set(remove_columns)
    return [c for c in column_names if c in wanted]


def apply_transform(dataset, fn: Callable, options: Mapping, tokenizer, *, desc: str | None = None, context: str = ""):
    """Map ``fn`` over ``dataset``; returns the kept original columns plus ``token_features()``.

    Exceptions raised by ``fn`` and outputs that fail ``validate_row`` become an ``ERROR`` reason on
    that row. A batched ``fn`` that fails on a batch is retried one row at a time so that only the
    rows that really fail are lost. ``context``: what else ``fn`` was made from (the transform factory's config
    and dataset entry, whose values its closure may hold), part of the map's cache key.
    """
    from datasets import Features

    batched = bool(options.get("batched", False))
    remove = columns_to_remove(options.get("remove_columns"), dataset.column_names)
    features = token_features()
    kept = {c: dataset.features[c] for c in dataset.column_names if c not in remove and c not in features}
    vocab_size = len(tokenizer) if tokenizer is not None else None

    def run(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        results = _call_batched(fn, batch, indices, tokenizer) if batched else _call_rows(fn, batch, indices, tokenizer)
        out: dict[str, list] = {name: [] for name in features}
        for row, result, error in results:
            fields: tuple[list[int], list[int], int | None] = ([], [], None)
            if error is None:
                try:
                    fields = validate_row(result, vocab_size)
                except (TypeError, ValueError) as exc:
                    error = f"invalid transform output: {exc}"
            for name, value in zip(TOKEN_COLUMNS, fields, strict=False):
                out[name].append(value)
            out[ERROR].append(error)
            out[ROW].append(row)
        return out

    return dataset.map(
        run,
        batched=True,
        with_indices=True,
        remove_columns=remove,
        features=Features({**kept, **features}),
        desc=desc,
        new_fingerprint=map_fingerprint(dataset, fn, options, tokenizer, context),
    )


def map_fingerprint(dataset, fn: Callable, options: Mapping, tokenizer, context: str = "") -> str:
    """The key of ``apply_transform``'s map in the ``datasets`` cache, from what decides its output: the input
    rows (their own fingerprint), the transform's source, options and ``context``, the tokenizer's files, and
    this module.

    Given explicitly, so that ``datasets`` does not pickle the ``run`` closure to hash it: that can take
    seconds, and its bare ``except:`` around the pickling swallows a Ctrl-C that lands there."""
    inputs = {
        "rows": dataset._fingerprint,
        "transform": source_digest(fn),
        "name": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}",
        "options": json.dumps(dict(options), sort_keys=True, default=str),
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "context": context,
        "rows_module": source_digest(apply_transform),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _call_rows(fn, batch, indices, tokenizer) -> list[tuple[int, object, str | None]]:
    results: list[tuple[int, object, str | None]] = []
    for j, index in enumerate(indices):
        example = {name: values[j] for name, values in batch.items()}
        try:
            results.append((index, fn(example, tokenizer=tokenizer), None))
        except Exception as exc:  # noqa: BLE001 - a transform may raise anything; report the row, go on
            results.append((index, None, _describe(exc)))
    return results


def _call_batched(fn, batch, indices, tokenizer) -> list[tuple[int, object, str | None]]:
    try:
        rows = _columns_to_rows(fn(batch, tokenizer=tokenizer))
    except Exception as exc:  # noqa: BLE001 - as in _call_rows; the batch is retried row by row
        if len(indices) == 1:
            return [(indices[0], None, _describe(exc))]
        results = []
        for j, index in enumerate(indices):
            one = {name: values[j : j + 1] for name, values in batch.items()}
            results.extend(_call_batched(fn, one, [index], tokenizer))
        return results
    # Output row j comes from input row j only when the transform kept the row count.
    same = len(rows) == len(indices)
    return [(indices[j] if same else -1, row, None) for j, row in enumerate(rows)]


def _columns_to_rows(columns) -> list[dict]:
    if not isinstance(columns, Mapping):
        raise TypeError(f"a batched transform returned {type(columns).__name__}, expected a dict of lists")
    sizes = {name: len(values) for name, values in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"a batched transform returned columns of different lengths: {sizes}")
    n = next(iter(sizes.values()), 0)
    return [{name: values[j] for name, values in columns.items()} for j in range(n)]


def _describe(exc: Exception) -> str:
    return f"transform raised {type(exc).__name__}: {exc}"


def validate_row(result, vocab_size: int | None) -> tuple[list[int], list[int], int | None]:
    """(input_ids, labels, prompt_length) of one transform output; TypeError/ValueError say what is wrong."""
    if not isinstance(result, Mapping):
        raise TypeError(f"got {type(result).__name__}, expected a dict")
    for name in ("input_ids", "labels"):
        if name not in result:
            raise ValueError(f"no '{name}' (strided mode needs input_ids and labels); got {sorted(result)}")
    input_ids = _int_list(result["input_ids"], "input_ids")
    labels = _int_list(result["labels"], "labels")
    if not input_ids:
        raise ValueError("input_ids is empty")
    if len(labels) != len(input_ids):
        raise ValueError(f"labels has {len(labels)} entries but input_ids has {len(input_ids)}")
    low, high = min(input_ids), max(input_ids)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary [0, {vocab_size})")
    if any(label < 0 and label != IGNORE_INDEX for label in labels):
        raise ValueError(f"labels must be token ids or {IGNORE_INDEX}")
    prompt_length = result.get("prompt_length")
    if prompt_length is not None:
        try:
            prompt_length = operator.index(prompt_length)
        except TypeError:
            raise TypeError(f"prompt_length must be an integer, got {prompt_length!r}") from None
        if not 0 <= prompt_length <= len(input_ids):
            raise ValueError(f"prompt_length {prompt_length} is outside [0, {len(input_ids)}]")
    return input_ids, labels, prompt_length


def _int_list(value, name: str) -> list[int]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of integers, got {type(value).__name__}")
    try:
        return [operator.index(v) for v in value]
    except TypeError:
        raise TypeError(f"{name} must be a list of integers") from None


def block_errors(
    lengths: Sequence[int],
    prompt_lengths: Sequence[int | None],
    *,
    sequence_len: int,
    context_length: int,
    stride: int,
    generate_max_len: int,
    min_completion_prefix: int,
) -> list[str | None]:
    """Why each row has no strided block (None when it has at least one), per docs/design.md §4.1."""

    reasons: list[str | None] = []
    for length, prompt_length in zip(lengths, prompt_lengths, strict=False):
        anchor = first_anchor(context_length, prompt_length, min_completion_prefix)
        if length > sequence_len:
            reasons.append(f"{length} tokens, more than sequence_len={sequence_len} (cut it in the transform)")
        elif num_blocks(length, anchor, stride, generate_max_len) == 0:
            reasons.append(
                f"no strided block fits: {length} tokens, but the first block needs {anchor + generate_max_len} "
                f"(first anchor {anchor} + generate_max_len {generate_max_len})"
            )
        else:
            reasons.append(None)
    return reasons
