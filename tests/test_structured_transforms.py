"""Structured-mode transforms (opencode, multi-turn, reasoning) on single rows: prompts, ground truths,
remaining turns and the errors of bad rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from structured_data_builders import assistant, user

from ebft.data.transforms import ebft_chat_multiturn, ebft_opencode, ebft_reasoning, resolve_transform
from ebft.errors import DataError


def system(content):
    return {"role": "system", "content": content}


def run(module, name, example):
    fn, options = getattr(module, name)(SimpleNamespace())
    assert options["remove_columns"] == "__all__"
    return fn(example)


def test_opencode_builds_a_one_message_chat_prompt():
    out = run(ebft_opencode, "transform", {"input": "Add 2 and 3.", "output": "5", "id": 7})
    assert out == {"prompt": [user("Add 2 and 3.")], "ground_truth": "5"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"output": "5"}, "'input' must be a non-empty string; it is missing"),
        ({"input": "", "output": "5"}, "'input' must be a non-empty string; it is empty"),
        ({"input": "q", "output": 5}, "'output' must be a non-empty string; it is a int"),
        ({"input": "q", "output": None}, "'output' must be a non-empty string; it is missing"),
    ],
)
def test_opencode_rejects_a_missing_or_bad_field(row, message):
    with pytest.raises(ValueError, match=message):
        run(ebft_opencode, "transform", row)


CONVERSATION = [
    system("be brief"),
    user("hi"),
    assistant("yo"),
    user("ok?"),
    assistant("sure"),
]


def test_multiturn_first_turn_with_the_rest_as_remaining_turns():
    out = run(ebft_chat_multiturn, "transform", {"messages": CONVERSATION})
    assert out == {
        "prompt": [system("be brief"), user("hi")],
        "ground_truth": "yo",
        "remaining_turns": [user("ok?"), assistant("sure")],
    }


def test_multiturn_single_turn_has_empty_remaining_turns():
    out = run(ebft_chat_multiturn, "transform", {"messages": [user("hi"), assistant("yo")]})
    assert out == {"prompt": [user("hi")], "ground_truth": "yo", "remaining_turns": []}


def test_multiturn_reads_sharegpt_conversations_and_drops_extra_message_keys():
    row = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ],
        "messages": None,
    }
    assert run(ebft_chat_multiturn, "transform", row)["prompt"] == [user("hi")]
    extra = {"messages": [{"role": "user", "content": "hi", "name": "ann"}, assistant("yo")]}
    assert run(ebft_chat_multiturn, "transform", extra)["prompt"] == [user("hi")]


@pytest.mark.parametrize("name", ["transform", "transform_last_turn"])
def test_multiturn_without_an_assistant_turn_is_an_error(name):
    with pytest.raises(ValueError, match="no assistant turn"):
        run(ebft_chat_multiturn, name, {"messages": [user("hi"), user("anyone?")]})


def test_multiturn_rejects_a_message_without_string_content():
    with pytest.raises(ValueError, match="message 1 must have a string role and content"):
        run(ebft_chat_multiturn, "transform", {"messages": [user("hi"), {"role": "assistant", "content": None}]})


def test_multiturn_last_turn():
    out = run(ebft_chat_multiturn, "transform_last_turn", {"messages": CONVERSATION})
    assert out == {"prompt": CONVERSATION[:4], "ground_truth": "sure"}


def test_multiturn_all_turns_gives_one_row_per_assistant_turn():
    fn, options = ebft_chat_multiturn.transform_all_turns(SimpleNamespace())
    assert options == {"remove_columns": "__all__", "batched": True}
    out = fn({"messages": [CONVERSATION, [user("a"), assistant("b")]], "id": [1, 2]})
    assert out == {
        "prompt": [CONVERSATION[:2], CONVERSATION[:4], [user("a")]],
        "ground_truth": ["yo", "sure", "b"],
    }


REASONING_ROW = {
    "messages": [
        user("2+2?"),
        assistant("<think>add</think>4"),
        user("and 3+3?"),
        assistant("<think>\nadd again\n</think>\n\n6"),
    ]
}


def test_reasoning_keeps_the_think_block_in_the_ground_truth():
    out = run(ebft_reasoning, "transform", REASONING_ROW)
    assert out == {"prompt": REASONING_ROW["messages"][:3], "ground_truth": "<think>\nadd again\n</think>\n\n6"}


@pytest.mark.parametrize(
    "content",
    [
        "<think>\n carry the one \n</think>\n\n12",
        "<reasoning>carry the one</reasoning>12",
        "<|begin_of_thought|>carry the one<|end_of_thought|>\n12\n",
    ],
)
def test_reasoning_split_thinking_for_each_tag_style(content):
    out = run(ebft_reasoning, "transform_split_thinking", {"messages": [user("6+6?"), assistant(content)]})
    assert out == {
        "prompt": [{"role": "user", "content": "6+6?", "reasoning_content": ""}],
        "ground_truth": "<think>\ncarry the one\n</think>\n\n12",
    }


def test_reasoning_split_thinking_normalises_earlier_turns_too():
    out = run(ebft_reasoning, "transform_split_thinking", REASONING_ROW)
    assert out["prompt"] == [
        {"role": "user", "content": "2+2?", "reasoning_content": ""},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
        {"role": "user", "content": "and 3+3?", "reasoning_content": ""},
    ]
    assert out["ground_truth"] == "<think>\nadd again\n</think>\n\n6"


def test_reasoning_split_thinking_without_reasoning_has_an_empty_think_block():
    out = run(ebft_reasoning, "transform_split_thinking", {"messages": [user("hi"), assistant("yo")]})
    assert out["ground_truth"] == "<think>\n\n</think>\n\nyo"


@pytest.mark.parametrize(
    ("content", "answer"),
    [
        ("<think>\nadd again\n</think>\n\n6", "6"),
        ("<reasoning>r</reasoning> 6 ", "6"),
        ("<|begin_of_thought|>r<|end_of_thought|>6<think>more</think>!", "6!"),
        ("no thinking here", "no thinking here"),
    ],
)
def test_reasoning_answer_only_removes_the_think_spans(content, answer):
    out = run(ebft_reasoning, "transform_answer_only", {"messages": [user("q"), assistant(content)]})
    assert out == {"prompt": [user("q")], "ground_truth": answer}


def test_structured_builtin_names_resolve_and_strided_reasoning_is_not_available():
    assert resolve_transform("ebft_opencode.transform") is ebft_opencode.transform
    assert resolve_transform("ebft_chat_multiturn.transform_all_turns") is ebft_chat_multiturn.transform_all_turns
    assert resolve_transform("ebft_reasoning.transform_answer_only") is ebft_reasoning.transform_answer_only
    with pytest.raises(DataError, match="'ebft_reasoning.transform_strided' is not available.*ebft_strided_chat"):
        resolve_transform("ebft_reasoning.transform_strided")
