"""Chat rendering for structured mode: prompts to token ids, and conversations with a generated-token mask.

Both functions are pure: a tokenizer, messages and the ``trl.chat_template_kwargs`` in, token ids
out. A rendered chat template already holds the BOS token where the model wants one, so its text is
tokenised with ``add_special_tokens=False``; a plain string prompt gets the tokenizer's own special
tokens instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ebft.errors import DataError


@dataclass(frozen=True)
class ConversationTokens:
    """A rendered conversation.

    ids: the token ids of the whole conversation (T tokens).
    prompt_length: how many leading ids are the rendered prompt (with its generation prompt).
    generated_mask: T bools, True on the tokens of the contents of the messages flagged generated.
    """

    ids: list[int]
    prompt_length: int
    generated_mask: list[bool]


def render_prompt_ids(
    tokenizer, prompt: str | Sequence[Mapping], chat_template_kwargs: Mapping | None = None
) -> list[int]:
    """Token ids the policy continues from.

    A string is tokenised as plain text with the tokenizer's special tokens (BOS where it adds one);
    a chat (list of ``{role, content}``) is rendered with the chat template and the generation prompt.
    """
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return _tokenize(tokenizer, _chat_text(tokenizer, prompt, True, chat_template_kwargs))


def conversation_tokens(
    tokenizer,
    messages: Sequence[Mapping],
    prompt_count: int,
    generated: Sequence[bool],
    chat_template_kwargs: Mapping | None = None,
    *,
    end_of_turn: Collection[int] = (),
) -> ConversationTokens:
    """The whole conversation rendered (no generation prompt) and tokenised, with its prompt and generated parts.

    ``messages[:prompt_count]`` is the prompt; ``generated`` has one flag per later message, True for
    the messages the policy wrote. ``prompt_length`` is the number of leading tokens the conversation
    shares with ``render_prompt_ids(messages[:prompt_count])``: all of them when the template renders
    a prefix of the conversation as a prefix of its rendering, fewer when it does not (say a
    generation prompt that differs from the header of a finished turn), in which case the prompt
    ends where the two renderings part. A generated message's content is located in the rendered
    text by searching forward from where the rendered prompt ends (verbatim, or stripped for
    templates that trim contents); ValueError when the template does not render it at all, since
    its tokens could then not be masked.

    ``end_of_turn``: stop token ids. When given, a generated message's mask also covers the markup the
    template writes after its content up to and including the first of these ids (``<|im_end|>``,
    ``</s>``, ...), which is what the policy has to produce to end its turn; markup that holds no such
    id before the next message is left out.
    """
    if not 1 <= prompt_count <= len(messages):
        raise ValueError(f"prompt_count {prompt_count} is outside [1, {len(messages)}] for {len(messages)} messages")
    if len(generated) != len(messages) - prompt_count:
        raise ValueError(
            f"generated has {len(generated)} flags for the {len(messages) - prompt_count} messages after the prompt"
        )
    if not tokenizer.is_fast:
        raise DataError("multi-turn conversations need a fast tokenizer (for token offsets); this one is not")
    prompt_text = _chat_text(tokenizer, messages[:prompt_count], True, chat_template_kwargs)
    text = _chat_text(tokenizer, messages, False, chat_template_kwargs)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    # A generated message's content comes after its own header: where the conversation up to it, rendered
    # with the generation prompt, parts from the whole text. Searching from there, not from the end of the
    # previous content, keeps a reply that also occurs in the markup between turns ("s" of "</s>", a
    # newline) from matching the markup.
    floors = [
        _common_prefix(_chat_text(tokenizer, messages[: prompt_count + i], True, chat_template_kwargs), text)
        if flag
        else 0
        for i, flag in enumerate(generated)
    ]
    contents = [m["content"] for m in messages[prompt_count:]]
    spans = content_spans(text, contents, _common_prefix(prompt_text, text), floors)
    missing = next(
        (i for i, (span, flag) in enumerate(zip(spans, generated, strict=True)) if flag and span is None), None
    )
    if missing is not None:
        raise ValueError(
            f"the chat template does not render the content of message {prompt_count + missing} verbatim, "
            "so its tokens cannot be found"
        )
    offsets = encoded["offset_mapping"]
    # Every generated message has its span (checked above); ``s is not None`` says so to the type checker.
    mask = token_mask(offsets, [s for s, flag in zip(spans, generated, strict=True) if flag and s is not None])
    if end_of_turn:
        mask = _with_turn_ends(mask, ids, offsets, spans, generated, len(text), set(end_of_turn))
    return ConversationTokens(
        ids=list(ids),
        prompt_length=_common_prefix(_tokenize(tokenizer, prompt_text), ids),
        generated_mask=mask,
    )


def _with_turn_ends(
    mask: list[bool],
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int] | None],
    generated: Sequence[bool],
    text_length: int,
    end_ids: set[int],
) -> list[bool]:
    """``mask`` plus, after each generated content, the tokens up to and including the first ``end_ids``
    token that starts before the next message's content (see ``conversation_tokens``)."""
    out = list(mask)
    for i, (span, flag) in enumerate(zip(spans, generated, strict=True)):
        if not flag or span is None:
            continue
        limit = next((later[0] for later in spans[i + 1 :] if later is not None), text_length)
        trailer = []
        for t, (start, end) in enumerate(offsets):
            if end <= span[1] or end <= start:
                continue  # the content itself (or before it), or a token with no characters
            if start >= limit:
                break
            trailer.append(t)
            if ids[t] in end_ids:
                for kept in trailer:
                    out[kept] = True
                break
    return out


def content_spans(
    text: str, contents: Sequence[str], start: int, floors: Sequence[int] | None = None
) -> list[tuple[int, int] | None]:
    """Character span ``[begin, end)`` of each content in ``text``, in order, searching forward from ``start``.

    A content is looked up verbatim, then stripped; an empty one is the empty span at the cursor (an
    empty reply has no tokens); None when neither occurs (the cursor stays put). ``floors[i]``, when
    beyond the cursor, is where content i starts at the earliest: it is looked up from there first.
    """
    spans: list[tuple[int, int] | None] = []
    cursor = start
    for i, content in enumerate(contents):
        span = None
        origins = [floors[i], cursor] if floors is not None and floors[i] > cursor else [cursor]
        for origin in origins:
            for needle in (content, content.strip()):
                begin = text.find(needle, origin) if needle else origin
                if begin >= 0:
                    span = (begin, begin + len(needle))
                    break
            if span is not None:
                cursor = span[1]
                break
        spans.append(span)
    return spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for each token whose characters ``[s, e)`` (non-empty) lie inside one of ``spans``."""
    return [e > s and any(a <= s and e <= b for a, b in spans) for s, e in offsets]


def _chat_text(tokenizer, messages: Sequence[Mapping], generation_prompt: bool, kwargs: Mapping | None) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the prompts are chat messages but the tokenizer has no chat_template; set chat_template to the "
            "model family's format (e.g. chatml, llama3, qwen3), use a tokenizer that has one, or give the "
            "prompts as strings"
        )
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=False, **dict(kwargs or {})
    )


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
