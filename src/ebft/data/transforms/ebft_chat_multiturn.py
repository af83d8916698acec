"""``ebft_chat_multiturn``: chat conversations as structured-mode rows, split at an assistant turn.

``messages`` (or ``conversations``; ShareGPT ``{from, value}`` is accepted) is a list of
``{role, content}``. Every message is reduced to exactly ``{role, content}`` (both strings) so that
the rows of one dataset share one Arrow schema.

- ``transform``: ``prompt`` = the messages before the first assistant turn, ``ground_truth`` = that
  turn's content, ``remaining_turns`` = every message after it, ``[]`` when none follows (always
  present, so single- and multi-turn rows share a schema).
- ``transform_last_turn``: ``prompt`` = the history before the last assistant turn, ``ground_truth``
  = its content.
- ``transform_all_turns`` (batched): one ``(prompt, ground_truth)`` row per assistant turn.

A conversation without an assistant turn, or with a message that is not a ``{role, content}`` pair
of strings, raises ValueError; the loader skips that row with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

from ebft.config import TrainConfig
from ebft.data.transforms.common import first_present
from ebft.data.transforms.ebft_strided_chat import normalize_messages

MESSAGE_FIELDS = ("messages", "conversations")


def transform(cfg: TrainConfig, **kwargs):
    return first_turn, {"remove_columns": "__all__"}


def transform_last_turn(cfg: TrainConfig, **kwargs):
    return last_turn, {"remove_columns": "__all__"}


def transform_all_turns(cfg: TrainConfig, **kwargs):
    return all_turns, {"remove_columns": "__all__", "batched": True}


def first_turn(example: Mapping, tokenizer=None) -> dict:
    messages = chat_messages(example)
    i = assistant_turns(messages)[0]
    return {
        "prompt": messages[:i],
        "ground_truth": messages[i]["content"],
        "remaining_turns": messages[i + 1 :],
    }


def last_turn(example: Mapping, tokenizer=None) -> dict:
    messages = chat_messages(example)
    i = assistant_turns(messages)[-1]
    return {"prompt": messages[:i], "ground_truth": messages[i]["content"]}


def all_turns(batch: Mapping[str, list], tokenizer=None) -> dict[str, list]:
    """Columns in, columns out: as many output rows as assistant turns in the batch."""
    out: dict[str, list] = {"prompt": [], "ground_truth": []}
    size = len(next(iter(batch.values()), []))
    for j in range(size):
        messages = chat_messages({name: values[j] for name, values in batch.items()})
        for i in assistant_turns(messages):
            out["prompt"].append(messages[:i])
            out["ground_truth"].append(messages[i]["content"])
    return out


def chat_messages(example: Mapping) -> list[dict]:
    """The row's conversation as ``[{role, content}]`` with string roles and contents."""
    messages = normalize_messages(example[first_present(example, MESSAGE_FIELDS, "chat")])
    return [plain_message(message, i) for i, message in enumerate(messages)]


def plain_message(message: Mapping, index: int) -> dict:
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(
            f"message {index} must have a string role and content, got role={role!r}, "
            f"content of type {type(content).__name__}"
        )
    return {"role": role, "content": content}


def assistant_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant messages; ValueError when there is none."""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise ValueError(f"the conversation has no assistant turn (roles: {[m['role'] for m in messages]})")
    return turns
