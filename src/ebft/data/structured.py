"""Load datasets for structured mode: raw rows -> transform -> checked prompt rows with token ids.

Every ``cfg.datasets`` entry is read with ``load_raw`` and run through its transform (``type:``; none
means the rows already hold ``prompt``/``ground_truth`` and optionally ``remaining_turns`` and
``tests``). Each output row is checked and tokenised into a ``PromptRow``; rows that cannot be used
are skipped, counted and the first one named, as in strided mode, and ``val_set_size`` rows are
held out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ebft.config import TrainConfig
from ebft.data.load import _transform_for, announce, load_raw, split_validation
from ebft.data.rows import _call_batched, _call_rows, columns_to_remove
from ebft.errors import DataError
from ebft.structured.chat import conversation_tokens, render_prompt_ids

logger = logging.getLogger("ebft")

# Rows handed to the transform at a time (a batched transform sees this many), as datasets.map does.
BATCH_SIZE = 1000


@dataclass(frozen=True)
class PromptRow:
    """One structured-mode example.

    prompt: as the transform gave it, a string or a list of ``{role, content}`` messages.
    ground_truth: the reference answer.
    remaining_turns: the messages after the first assistant turn (multi-turn rows); () otherwise.
    prompt_ids: ``render_prompt_ids(prompt)``, at most ``sequence_len - trl.max_completion_length`` ids.
    gt_ids: what the policy should produce after ``prompt_ids`` (no stop token), cut to
        ``sequence_len - len(prompt_ids)``: the tokenised ground truth for single-turn rows; for
        multi-turn rows the rendered conversation ``prompt + [assistant ground_truth] +
        remaining_turns`` after its prompt tokens (see ``conversation_tokens``).
    source: where the row came from, "dataset 'path', row N", for messages.
    tests: the unit tests of a code row (test code such as assert statements, each run after the
        code by ``ebft evaluate --execute``), from the transform's optional ``tests`` field; () without.
    """

    prompt: str | list[dict]
    ground_truth: str
    remaining_turns: tuple[dict, ...]
    prompt_ids: tuple[int, ...]
    gt_ids: tuple[int, ...]
    source: str
    tests: tuple[str, ...] = ()


@dataclass
class StructuredData:
    """Checked prompt rows of every dataset entry, split into training and held-out rows."""

    train: list[PromptRow]
    val: list[PromptRow] | None
    skipped: int
    first_skip_reason: str | None


def load_structured_datasets(cfg: TrainConfig, tokenizer, *, search_dir: str | Path | None = None) -> StructuredData:
    """Prompt rows of every ``cfg.datasets`` entry, with ``val_set_size`` held out.

    Reads ``cfg.datasets``, ``cfg.sequence_len``, ``cfg.trl.max_completion_length``,
    ``cfg.trl.chat_template_kwargs``, ``cfg.val_set_size`` and ``cfg.seed``. ``search_dir``
    (normally the config file's folder) is where custom transform modules are looked up besides
    ``sys.path``. Unusable rows are counted in ``skipped`` and the first one is named in a warning
    and in ``first_skip_reason``; a DataError is raised when no row is left.
    """
    sequence_len, max_completion_length = int(cfg.sequence_len), int(cfg.trl.max_completion_length)
    rows: list[PromptRow] = []
    skipped, first = 0, None
    for spec in cfg.datasets:
        raw = load_raw(spec)
        fn, options = _transform_for(spec, cfg, search_dir)
        announce(spec, len(raw))
        if options.get("pack_length") is not None:
            raise DataError(
                f"dataset '{spec.path}': transform '{spec.type}' packs documents into token chunks, which "
                "structured mode cannot use (it needs prompt/ground_truth rows)"
            )
        for source, result, error in transformed_rows(raw, fn, options, tokenizer, str(spec.path)):
            if error is None:
                try:
                    rows.append(
                        prompt_row(
                            result,
                            tokenizer,
                            source=source,
                            sequence_len=sequence_len,
                            max_completion_length=max_completion_length,
                            chat_template_kwargs=cfg.trl.chat_template_kwargs,
                        )
                    )
                    continue
                except DataError:
                    raise
                except ValueError as exc:
                    error = str(exc)
                except Exception as exc:  # noqa: BLE001 - a chat template may raise anything for one row
                    error = f"rendering failed: {type(exc).__name__}: {exc}"
            skipped += 1
            first = first or f"{source}: {error}"

    paths = ", ".join(f"'{spec.path}'" for spec in cfg.datasets)
    if skipped:
        logger.warning("Skipped %d unusable rows of %s for structured training; first: %s", skipped, paths, first)
    if not rows:
        if skipped == 0:
            raise DataError(f"no rows to train on: {paths} yielded no rows")
        raise DataError(f"no rows to train on: all {skipped} rows of {paths} were skipped; first: {first}")
    train, val = split_rows(rows, cfg.val_set_size, cfg.seed)
    return StructuredData(train=train, val=val, skipped=skipped, first_skip_reason=first)


def transformed_rows(
    raw, fn: Callable, options: Mapping, tokenizer, path: str
) -> Iterator[tuple[str, object, str | None]]:
    """(source, transform output, error) for every output row, in order; the error is None when it ran.

    Uses the strided loader's row calls, so a failing row (or, batched, the failing rows of a batch)
    becomes an error instead of aborting. The original columns that ``remove_columns`` keeps are
    merged under the output, as ``datasets.map`` would; a batched transform that changed the number
    of rows has no source row, so its outputs are named by output position.
    """
    batched = bool(options.get("batched", False))
    removed = set(columns_to_remove(options.get("remove_columns"), raw.column_names))
    kept = [c for c in raw.column_names if c not in removed]
    call = _call_batched if batched else _call_rows
    start, position = 0, 0
    for batch in raw.iter(batch_size=BATCH_SIZE):
        size = len(next(iter(batch.values()), []))
        results = call(fn, batch, list(range(start, start + size)), tokenizer)
        for j, (index, result, error) in enumerate(results):
            if index >= 0:
                source = f"dataset '{path}', row {index}"
                if kept and isinstance(result, Mapping):
                    result = {**{c: batch[c][index - start] for c in kept}, **result}
            else:
                source = f"dataset '{path}', output row {position + j} of the batched transform"
            yield source, result, error
        position += len(results)
        start += size


def prompt_row(
    result,
    tokenizer,
    *,
    sequence_len: int,
    max_completion_length: int,
    chat_template_kwargs: Mapping | None,
    source: str,
) -> PromptRow:
    """The checked, tokenised row; ValueError says why a row cannot be used."""
    prompt, ground_truth, remaining = checked_fields(result)
    tests = checked_tests(result)
    prompt_ids = render_prompt_ids(tokenizer, prompt, chat_template_kwargs)
    room = sequence_len - max_completion_length
    if len(prompt_ids) > room:
        raise ValueError(
            f"prompt is {len(prompt_ids)} tokens; sequence_len - trl.max_completion_length = {room} leaves no room"
        )
    if remaining:
        conversation = [*prompt, {"role": "assistant", "content": ground_truth}, *remaining]
        # Flagging the assistant turns checks now that the template renders their contents findably,
        # which multi-turn training needs to mask the turns the policy writes.
        flags = [message["role"] == "assistant" for message in conversation[len(prompt) :]]
        tokens = conversation_tokens(tokenizer, conversation, len(prompt), flags, chat_template_kwargs)
        gt_ids = tokens.ids[tokens.prompt_length :]
    else:
        gt_ids = tokenizer(ground_truth, add_special_tokens=False)["input_ids"]
    return PromptRow(
        prompt=prompt,
        ground_truth=ground_truth,
        remaining_turns=tuple(remaining),
        prompt_ids=tuple(prompt_ids),
        gt_ids=tuple(gt_ids[: sequence_len - len(prompt_ids)]),
        source=source,
        tests=tests,
    )


def checked_fields(result) -> tuple[str | list[dict], str, list[dict]]:
    """(prompt, ground_truth, remaining_turns) of one transform output; ValueError says what is wrong."""
    if not isinstance(result, Mapping):
        raise ValueError(f"the transform returned a {type(result).__name__}, expected a dict")
    for name in ("prompt", "ground_truth"):
        if result.get(name) is None:
            raise ValueError(f"no '{name}' (structured mode needs prompt and ground_truth); got {sorted(result)}")
    prompt, ground_truth = result["prompt"], result["ground_truth"]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is an empty string")
    elif isinstance(prompt, list):
        if not prompt:
            raise ValueError("prompt is an empty list of messages")
        check_messages(prompt, "prompt")
    else:
        raise ValueError(
            f"prompt must be a string or a list of {{role, content}} messages, got {type(prompt).__name__}"
        )
    if not isinstance(ground_truth, str) or not ground_truth:
        got = "empty" if ground_truth == "" else f"a {type(ground_truth).__name__}"
        raise ValueError(f"ground_truth must be a non-empty string; it is {got}")
    remaining = result.get("remaining_turns") or []
    if not isinstance(remaining, list):
        raise ValueError(
            f"remaining_turns must be a list of {{role, content}} messages, got {type(remaining).__name__}"
        )
    check_messages(remaining, "remaining_turns")
    if remaining and isinstance(prompt, str):
        raise ValueError("remaining_turns needs a chat prompt (a list of messages); the prompt is a string")
    return prompt, ground_truth, remaining


def checked_tests(result: Mapping) -> tuple[str, ...]:
    """The row's optional ``tests``: a string (one test) or a list of strings; ValueError otherwise."""
    tests = result.get("tests")
    if tests is None:
        return ()
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"tests must be a string or a list of strings, got {tests!r:.80}")
    # A blank test passes any code, so it would count the row as tested with nothing tested.
    return tuple(t for t in tests if t.strip())


def check_messages(messages: list, field: str) -> None:
    for i, message in enumerate(messages):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"{field} message {i} must be {{role: str, content: str}}, got {message!r}")


def split_rows(rows: list[PromptRow], val_set_size: float, seed: int) -> tuple[list[PromptRow], list[PromptRow] | None]:
    """``split_validation`` on a list: the same seeded choice, sizes and errors as for a Dataset."""
    from datasets import Dataset

    index = Dataset.from_dict({"i": list(range(len(rows)))})
    train, val = split_validation(index, val_set_size, seed)
    return [rows[i] for i in train["i"]], None if val is None else [rows[i] for i in val["i"]]
