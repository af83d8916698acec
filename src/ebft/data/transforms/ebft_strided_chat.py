"""``ebft_strided_chat.transform``: chat conversations as strided documents.

``messages`` (or ``conversations``) is a list of ``{role, content}`` (ShareGPT ``{from, value}`` is
accepted too). The conversation is rendered with the tokenizer's chat template and every assistant
turn is labelled (its content and the template's end-of-turn marker; the assistant header is not);
all other tokens are -100. ``prompt_length`` is the first labelled index, so no block starts before
the first answer. Cut to ``sequence_len``.

Turn boundaries come from rendering growing prefixes of the conversation: assistant turn i spans from
the end of ``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i+1]``. This
needs a template whose rendering of a prefix is a prefix of the full rendering; a template that
rewrites earlier turns (for example one that drops old reasoning) makes the row fail with that reason
instead of being labelled at the wrong tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

from ebft.config import TrainConfig
from ebft.data.transforms.common import first_present, require_tokenizer

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


def transform(cfg: TrainConfig, **kwargs):
    sequence_len = int(cfg.sequence_len)

    def tokenize_chat(example: dict, tokenizer=None) -> dict:
        tok = require_tokenizer(tokenizer, "ebft_strided_chat.transform")
        messages = normalize_messages(example[first_present(example, ("messages", "conversations"), "chat")])
        input_ids, labels = label_assistant_turns(tok, messages)
        prompt_length = next((i for i, label in enumerate(labels) if label != -100), None)
        if prompt_length is None:
            raise ValueError("the conversation has no assistant turn with content to label")
        if prompt_length >= sequence_len:
            raise ValueError(
                f"the first assistant turn starts at token {prompt_length}, beyond sequence_len={sequence_len}"
            )
        return {
            "input_ids": input_ids[:sequence_len],
            "labels": labels[:sequence_len],
            "prompt_length": prompt_length,
        }

    return tokenize_chat, {"remove_columns": "__all__"}


def normalize_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"a message is {type(message).__name__}, expected {{role, content}}")
        if "role" in message:
            out.append(dict(message))
        elif "from" in message and message["from"] in SHAREGPT_ROLES:
            out.append({"role": SHAREGPT_ROLES[message["from"]], "content": message.get("value")})
        else:
            raise ValueError(f"a message has no role: {dict(message)}")
    return out


def label_assistant_turns(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        end = _prefix_length(tokenizer, full, messages[: i + 1], generation_prompt=False)
        try:
            start = _prefix_length(tokenizer, full, messages[:i], generation_prompt=True)
        except Exception:  # noqa: BLE001 - any template failure falls back to the checked boundary
            # Some templates' generation prompt differs from how they render a finished turn (or
            # cannot render an empty history); the turn then starts right after the previous
            # message and its header is labelled too. That boundary is checked like the others.
            start = _prefix_length(tokenizer, full, messages[:i], generation_prompt=False)
        labels[start:end] = full[start:end]
    return full, labels


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    # The template writes any BOS itself, so the text is tokenized without adding special tokens.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_length(tokenizer, full: list[int], messages: list[dict], generation_prompt: bool) -> int:
    prefix = _render(tokenizer, messages, generation_prompt) if messages or generation_prompt else []
    if full[: len(prefix)] != prefix:
        raise ValueError(
            f"the chat template renders the first {len(messages)} messages differently from the "
            "start of the whole conversation, so turn boundaries cannot be found"
        )
    return len(prefix)
