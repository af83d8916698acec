"""``ebft_reasoning``: reasoning conversations (assistant turns with a think block) for structured mode.

The target is always the last assistant turn; ``prompt`` is the history before it (as
``{role, content}`` messages, see ``ebft_chat_multiturn``).

- ``transform``: ``ground_truth`` = the last assistant content as written, think block included.
- ``transform_split_thinking``: every message becomes ``{role, content, reasoning_content}``; an
  assistant message's reasoning is taken out of ``<think>…</think>``, ``<reasoning>…</reasoning>``
  or ``<|begin_of_thought|>…<|end_of_thought|>`` into ``reasoning_content`` (for chat templates
  with native reasoning, such as Qwen3's). ``reasoning_content`` is always a string, "" when there
  is none, so that every row has the same Arrow schema. ``ground_truth`` =
  ``"<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer``, the form those templates render.
- ``transform_answer_only``: ``ground_truth`` = the last assistant content without its think spans.

There is no ``transform_strided`` here (strided reasoning data: ``ebft_strided_chat.transform``);
``resolve_transform`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ebft.config import TrainConfig
from ebft.data.transforms.ebft_chat_multiturn import assistant_turns, chat_messages, last_turn

# One alternative per tag style; the inner text is in whichever group matched.
THINK_SPAN = re.compile(
    r"<think>(.*?)</think>|<reasoning>(.*?)</reasoning>|<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>",
    re.DOTALL,
)


def transform(cfg: TrainConfig, **kwargs):
    # The last assistant content as written is exactly what the multi-turn last-turn split gives.
    return last_turn, {"remove_columns": "__all__"}


def transform_split_thinking(cfg: TrainConfig, **kwargs):
    return split_thinking, {"remove_columns": "__all__"}


def transform_answer_only(cfg: TrainConfig, **kwargs):
    return answer_only, {"remove_columns": "__all__"}


def split_thinking(example: Mapping, tokenizer=None) -> dict:
    messages = [with_reasoning(message) for message in chat_messages(example)]
    i = assistant_turns(messages)[-1]
    target = messages[i]
    return {
        "prompt": messages[:i],
        "ground_truth": f"<think>\n{target['reasoning_content']}\n</think>\n\n{target['content']}",
    }


def answer_only(example: Mapping, tokenizer=None) -> dict:
    messages = chat_messages(example)
    i = assistant_turns(messages)[-1]
    return {"prompt": messages[:i], "ground_truth": split_reasoning(messages[i]["content"])[1]}


def with_reasoning(message: dict) -> dict:
    """``{role, content, reasoning_content}``; only assistant messages have their reasoning split out."""
    if message["role"] != "assistant":
        return {**message, "reasoning_content": ""}
    reasoning, answer = split_reasoning(message["content"])
    return {"role": message["role"], "content": answer, "reasoning_content": reasoning}


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer): the inner text of every think span, and the content without them, stripped."""
    spans = [next(group for group in match.groups() if group is not None) for match in THINK_SPAN.finditer(content)]
    reasoning = "\n\n".join(span.strip() for span in spans)
    return reasoning, THINK_SPAN.sub("", content).strip()
