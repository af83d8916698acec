"""Structured-mode data: chat rendering (prompt ids, conversation tokens and their generated-turn masks) and
load_structured_datasets (every transform, bad rows, lengths, validation split, custom transforms).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from types import SimpleNamespace

import pytest
from structured_data_builders import assistant, user

from ebft.data.structured import load_structured_datasets
from ebft.errors import DataError
from ebft.structured.chat import conversation_tokens, render_prompt_ids

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]

ROLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Renders an assistant's reasoning_content in a think block; enable_thinking=false closes an empty
# think block in the generation prompt (as Qwen3's template does).
REASONING_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' and m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)


def char_tokenizer(chat_template=ROLE_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


# ---------------------------------------------------------------------------------------------------
# Chat rendering


def test_render_prompt_ids_of_a_string_adds_the_tokenizers_bos(tok):
    assert tokens(tok, render_prompt_ids(tok, "hi there")) == ["<s>", "h", "i", "Ġ", "t", "h", "e", "r", "e"]


def test_render_prompt_ids_of_a_chat_uses_the_template_bos_once_and_the_generation_prompt(tok):
    ids = render_prompt_ids(tok, [user("hi")], None)
    assert tokens(tok, ids) == ["<s>", "<|user|>", "Ċ", "h", "i", "</s>", "Ċ", "<|assistant|>", "Ċ"]


def test_render_prompt_ids_passes_chat_template_kwargs():
    reasoning = char_tokenizer(REASONING_TEMPLATE)
    thinking = tokens(reasoning, render_prompt_ids(reasoning, [user("q")], {}))
    assert thinking == ["<s>", "<|user|>", "Ċ", "q", "</s>", "Ċ", "<|assistant|>", "Ċ"]
    quiet = tokens(reasoning, render_prompt_ids(reasoning, [user("q")], {"enable_thinking": False}))
    assert quiet == thinking + list("<think></think>")


def test_a_chat_prompt_needs_a_chat_template():
    bare = char_tokenizer(chat_template=None)
    with pytest.raises(DataError, match="tokenizer has no chat_template; set chat_template to .*as strings"):
        render_prompt_ids(bare, [user("hi")])
    assert tokens(bare, render_prompt_ids(bare, "hi")) == ["<s>", "h", "i"]


def test_conversation_tokens_masks_the_generated_turns(tok):
    messages = [user("hi"), assistant("yo"), user("ok?"), assistant("sure")]
    conv = conversation_tokens(tok, messages, 1, [True, False, True], None)
    # fmt: off
    assert tokens(tok, conv.ids) == [
        "<s>", "<|user|>", "Ċ", "h", "i", "</s>", "Ċ", "<|assistant|>", "Ċ",  # 0-8: the prompt
        "y", "o", "</s>", "Ċ",                                                # 9-12: generated "yo"
        "<|user|>", "Ċ", "o", "k", "?", "</s>", "Ċ",                          # 13-19: the user's turn
        "<|assistant|>", "Ċ", "s", "u", "r", "e", "</s>", "Ċ",                # 20-27: generated "sure"
    ]
    # fmt: on
    assert conv.prompt_length == 9
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [9, 10, 22, 23, 24, 25]


def test_conversation_tokens_prompt_may_hold_earlier_turns_and_flags_follow_them(tok):
    messages = [user("hi"), assistant("yo"), user("ok?"), assistant("sure")]
    conv = conversation_tokens(tok, messages, 3, [True], None)
    assert conv.prompt_length == 22  # up to and including "<|assistant|>", "Ċ" of the last turn
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [22, 23, 24, 25]
    unflagged = conversation_tokens(tok, messages, 3, [False], None)
    assert not any(unflagged.generated_mask)


def test_conversation_tokens_finds_a_reply_that_repeats_the_prompt_after_the_prompt(tok):
    conv = conversation_tokens(tok, [user("yo"), assistant("yo")], 1, [True], None)
    assert conv.prompt_length == 9
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [9, 10]


def test_conversation_tokens_empty_reply_has_no_generated_tokens(tok):
    conv = conversation_tokens(tok, [user("hi"), assistant("")], 1, [True], None)
    assert tokens(tok, conv.ids[conv.prompt_length :]) == ["</s>", "Ċ"]
    assert not any(conv.generated_mask)


def test_conversation_tokens_prompt_length_is_the_common_prefix_when_renderings_differ():
    # Finished turns have no newline after the role marker, the generation prompt has one.
    differing = char_tokenizer(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    conv = conversation_tokens(differing, [user("hi"), assistant("yo")], 1, [True], None)
    assert tokens(differing, conv.ids) == ["<s>", "<|user|>", "h", "i", "</s>", "<|assistant|>", "y", "o", "</s>"]
    assert conv.prompt_length == 6
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [6, 7]


def test_conversation_tokens_finds_contents_a_template_trims():
    trimming = char_tokenizer(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    conv = conversation_tokens(trimming, [user("hi"), assistant(" yo\n")], 1, [True], None)
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [9, 10]


def test_conversation_tokens_errors(tok):
    unrendered = char_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="does not render the content of message 1"):
        conversation_tokens(unrendered, [user("hi"), assistant("yo")], 1, [True], None)
    with pytest.raises(ValueError, match="generated has 2 flags for the 1 messages"):
        conversation_tokens(tok, [user("hi"), assistant("yo")], 1, [True, True], None)
    with pytest.raises(ValueError, match="prompt_count 0 is outside"):
        conversation_tokens(tok, [user("hi"), assistant("yo")], 0, [True, True], None)


def test_conversation_tokens_with_reasoning_content():
    reasoning = char_tokenizer(REASONING_TEMPLATE)
    messages = [
        {"role": "user", "content": "q", "reasoning_content": ""},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
    ]
    conv = conversation_tokens(reasoning, messages, 1, [True], {})
    after = tokens(reasoning, conv.ids[conv.prompt_length :])
    assert after == [*"<think>r</think>a", "</s>", "Ċ"]
    assert [t for t, flag in enumerate(conv.generated_mask) if flag] == [conv.prompt_length + 16]  # only "a"


# ---------------------------------------------------------------------------------------------------
# load_structured_datasets


def make_cfg(*datasets, sequence_len=64, max_completion_length=16, val_set_size=0.0, seed=0, kwargs=None):
    trl = SimpleNamespace(max_completion_length=max_completion_length, chat_template_kwargs=kwargs)
    return SimpleNamespace(
        datasets=list(datasets), sequence_len=sequence_len, trl=trl, val_set_size=val_set_size, seed=seed
    )


def make_spec(path, type=None):
    return SimpleNamespace(path=str(path), type=type, split="train", data_files=None, name=None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPT_HI = ["<s>", "<|user|>", "Ċ", "h", "i", "</s>", "Ċ", "<|assistant|>", "Ċ"]


def test_load_opencode(tmp_path, tok):
    path = write_jsonl(tmp_path / "code.jsonl", [{"input": "hi", "output": "yo"}, {"input": "x", "output": "ab"}])
    data = load_structured_datasets(make_cfg(make_spec(path, "ebft_opencode.transform")), tok)
    assert data.skipped == 0 and data.first_skip_reason is None and data.val is None
    first, second = data.train
    assert first.prompt == [user("hi")] and first.ground_truth == "yo" and first.remaining_turns == ()
    assert tokens(tok, first.prompt_ids) == PROMPT_HI
    assert tokens(tok, first.gt_ids) == ["y", "o"]  # single-turn: no BOS, no stop token
    assert first.source == f"dataset '{path}', row 0"
    assert second.source == f"dataset '{path}', row 1"


def test_load_multiturn_first_turn_targets_the_rest_of_the_conversation(tmp_path, tok):
    rows = [
        {"messages": [user("hi"), assistant("yo"), user("ok?"), assistant("sure")]},
        {"messages": [user("hi"), assistant("yo")]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    multi, single = load_structured_datasets(make_cfg(make_spec(path, "ebft_chat_multiturn.transform")), tok).train
    assert multi.remaining_turns == (user("ok?"), assistant("sure"))
    assert tokens(tok, multi.prompt_ids) == PROMPT_HI
    # fmt: off
    assert tokens(tok, multi.gt_ids) == [
        "y", "o", "</s>", "Ċ", "<|user|>", "Ċ", "o", "k", "?", "</s>", "Ċ",
        "<|assistant|>", "Ċ", "s", "u", "r", "e", "</s>", "Ċ",
    ]
    # fmt: on
    assert single.remaining_turns == ()
    assert tokens(tok, single.gt_ids) == ["y", "o"]


def test_load_multiturn_last_turn_and_all_turns(tmp_path, tok):
    rows = [
        {"messages": [user("hi"), assistant("yo"), user("ok?"), assistant("sure")]},
        {"messages": [user("a"), assistant("b")]},
        {"messages": [user("c"), assistant("d"), user("e"), assistant("f"), user("g"), assistant("h")]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    last = load_structured_datasets(make_cfg(make_spec(path, "ebft_chat_multiturn.transform_last_turn")), tok)
    assert [row.ground_truth for row in last.train] == ["sure", "b", "h"]
    assert [len(row.prompt) for row in last.train] == [3, 1, 5]
    every = load_structured_datasets(make_cfg(make_spec(path, "ebft_chat_multiturn.transform_all_turns")), tok)
    assert [row.ground_truth for row in every.train] == ["yo", "sure", "b", "d", "f", "h"]
    # The batched transform changed the row count, so rows are named by output position.
    assert every.train[5].source == f"dataset '{path}', output row 5 of the batched transform"


@pytest.mark.parametrize(
    ("type_name", "ground_truth"),
    [
        ("ebft_reasoning.transform", "<think>r</think>6"),
        ("ebft_reasoning.transform_split_thinking", "<think>\nr\n</think>\n\n6"),
        ("ebft_reasoning.transform_answer_only", "6"),
    ],
)
def test_load_reasoning(tmp_path, tok, type_name, ground_truth):
    path = write_jsonl(tmp_path / "think.jsonl", [{"messages": [user("hi"), assistant("<think>r</think>6")]}])
    (row,) = load_structured_datasets(make_cfg(make_spec(path, type_name)), tok).train
    assert row.ground_truth == ground_truth
    assert tokens(tok, row.prompt_ids) == PROMPT_HI
    assert tok.decode(row.gt_ids) == ground_truth


def test_load_without_type_takes_prompt_rows_as_they_are(tmp_path, tok):
    rows = [
        {"prompt": "hi", "ground_truth": "yo"},
        {"prompt": "ab", "ground_truth": "c"},
    ]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    first, second = load_structured_datasets(make_cfg(make_spec(path)), tok).train
    assert first.prompt == "hi"
    assert tokens(tok, first.prompt_ids) == ["<s>", "h", "i"]
    assert tokens(tok, second.gt_ids) == ["c"]


def test_load_without_type_with_remaining_turns(tmp_path, tok):
    rows = [
        {"prompt": [user("hi")], "ground_truth": "yo", "remaining_turns": [user("ok?"), assistant("sure")]},
        {"prompt": [user("hi")], "ground_truth": "yo", "remaining_turns": None},
    ]
    path = write_jsonl(tmp_path / "turns.jsonl", rows)
    multi, single = load_structured_datasets(make_cfg(make_spec(path)), tok).train
    assert len(multi.gt_ids) == 19 and multi.remaining_turns == (user("ok?"), assistant("sure"))
    assert single.remaining_turns == ()


def test_bad_rows_are_skipped_counted_and_the_first_named(tmp_path, tok, caplog):
    rows = [
        {"input": "hi", "output": "yo"},
        {"input": "hi", "output": ""},
        {"input": None, "output": "yo"},
        {"input": "ab", "output": "cd"},
    ]
    path = write_jsonl(tmp_path / "code.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ebft"):
        data = load_structured_datasets(make_cfg(make_spec(path, "ebft_opencode.transform")), tok)
    assert [row.ground_truth for row in data.train] == ["yo", "cd"]
    assert data.skipped == 2
    assert data.first_skip_reason == (
        f"dataset '{path}', row 1: transform raised ValueError: 'output' must be a non-empty string; it is empty"
    )
    assert f"Skipped 2 unusable rows of '{path}' for structured training; first: dataset '{path}', row 1" in caplog.text


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"ground_truth": "yo"}, "no 'prompt' (structured mode needs prompt and ground_truth)"),
        ({"prompt": "", "ground_truth": "yo"}, "prompt is an empty string"),
        ({"prompt": [], "ground_truth": "yo"}, "prompt is an empty list of messages"),
        ({"prompt": 3, "ground_truth": "yo"}, "prompt must be a string or a list of {role, content} messages, got int"),
        ({"prompt": [{"role": "user"}], "ground_truth": "yo"}, "prompt message 0 must be {role: str, content: str}"),
        ({"prompt": "hi", "ground_truth": ""}, "ground_truth must be a non-empty string; it is empty"),
        ({"prompt": "hi", "ground_truth": 4}, "ground_truth must be a non-empty string; it is a int"),
        (
            {"prompt": [user("hi")], "ground_truth": "yo", "remaining_turns": "more"},
            "remaining_turns must be a list of {role, content} messages, got str",
        ),
        (
            {"prompt": [user("hi")], "ground_truth": "yo", "remaining_turns": [{"content": "x"}]},
            "remaining_turns message 0 must be {role: str, content: str}",
        ),
        (
            {"prompt": "hi", "ground_truth": "yo", "remaining_turns": [user("x")]},
            "remaining_turns needs a chat prompt",
        ),
        ("not a dict", "the transform returned a str, expected a dict"),
    ],
)
def test_each_bad_row_reason(tmp_path, tok, row, reason):
    module = f"ebft_rows_{uuid.uuid4().hex}"
    # A custom transform hands the row over as is, so that values Arrow could not hold in one column
    # (an int prompt next to a string one) reach the checks.
    (tmp_path / f"{module}.py").write_text(
        "def transform(cfg, **kwargs):\n"
        f"    return (lambda example, tokenizer=None: {row!r}), {{'remove_columns': '__all__'}}\n"
    )
    path = write_jsonl(tmp_path / "any.jsonl", [{"x": 1}])
    try:
        with pytest.raises(DataError) as info:
            load_structured_datasets(make_cfg(make_spec(path, f"{module}.transform")), tok, search_dir=tmp_path)
    finally:
        sys.modules.pop(module, None)
    assert str(info.value).startswith(f"no rows to train on: all 1 rows of '{path}' were skipped; first: ")
    assert f"dataset '{path}', row 0: {reason}" in str(info.value)


def test_a_long_prompt_is_skipped_and_a_long_ground_truth_is_cut(tmp_path, tok):
    rows = [{"input": "hi", "output": "abcdefghijklmnop"}, {"input": "abcdef", "output": "x"}]
    path = write_jsonl(tmp_path / "code.jsonl", rows)
    cfg = make_cfg(make_spec(path, "ebft_opencode.transform"), sequence_len=20, max_completion_length=8)
    data = load_structured_datasets(cfg, tok)
    (row,) = data.train
    assert len(row.prompt_ids) == 9
    assert tokens(tok, row.gt_ids) == list("abcdefghijk")  # 20 - 9 = 11 tokens kept
    assert data.first_skip_reason == (
        f"dataset '{path}', row 1: prompt is 13 tokens; sequence_len - trl.max_completion_length = 12 leaves no room"
    )


def test_nothing_left_is_a_data_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user("hi")]}, {"messages": [user("again")]}])
    with pytest.raises(DataError, match=r"all 2 rows of .* were skipped; first: dataset '.*', row 0: .*no assistant"):
        load_structured_datasets(make_cfg(make_spec(path, "ebft_chat_multiturn.transform")), tok)


def test_chat_prompts_without_a_chat_template_stop_the_load(tmp_path):
    path = write_jsonl(tmp_path / "code.jsonl", [{"input": "hi", "output": "yo"}])
    with pytest.raises(DataError, match="no chat_template"):
        load_structured_datasets(make_cfg(make_spec(path, "ebft_opencode.transform")), char_tokenizer(None))


def test_several_datasets_are_concatenated_in_order(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"input": "a", "output": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "ground_truth": "2"}])
    data = load_structured_datasets(make_cfg(make_spec(a, "ebft_opencode.transform"), make_spec(b)), tok)
    assert [row.ground_truth for row in data.train] == ["1", "2"]


@pytest.mark.parametrize(("val_set_size", "sizes"), [(0.25, (6, 2)), (3, (5, 3)), (0, (8, None))])
def test_val_set_size(tmp_path, tok, val_set_size, sizes):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"p{i}", "ground_truth": str(i)} for i in range(8)])
    data = load_structured_datasets(make_cfg(make_spec(path), val_set_size=val_set_size, seed=3), tok)
    assert (len(data.train), None if data.val is None else len(data.val)) == sizes
    held = [] if data.val is None else [row.ground_truth for row in data.val]
    assert sorted([row.ground_truth for row in data.train] + held) == [str(i) for i in range(8)]
    again = load_structured_datasets(make_cfg(make_spec(path), val_set_size=val_set_size, seed=3), tok)
    assert again.train == data.train  # seeded


def test_val_set_size_that_leaves_no_training_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "p", "ground_truth": "g"}] * 2)
    with pytest.raises(DataError, match="val_set_size=2 leaves no training rows out of 2"):
        load_structured_datasets(make_cfg(make_spec(path), val_set_size=2), tok)


CUSTOM_MODULE = """
def transform(cfg, **kwargs):
    def to_prompt(example, tokenizer=None):
        return {"prompt": [{"role": "user", "content": example["question"]}], "ground_truth": example["answer"]}
    return to_prompt, {"remove_columns": "__all__"}


def answer_only(cfg, **kwargs):
    # Keeps the original columns: the prompt column of the dataset is used as it is.
    return (lambda example, tokenizer=None: {"ground_truth": example["answer"].upper()}), {}
"""


@pytest.fixture
def custom_module(tmp_path):
    name = f"ebft_custom_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(CUSTOM_MODULE)
    yield name
    sys.modules.pop(name, None)


def test_custom_transform_next_to_the_config(tmp_path, tok, custom_module):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hi", "answer": "yo", "id": 1}])
    cfg = make_cfg(make_spec(path, f"{custom_module}.transform"))
    (row,) = load_structured_datasets(cfg, tok, search_dir=tmp_path).train
    assert row.prompt == [user("hi")] and row.ground_truth == "yo"
    assert tokens(tok, row.prompt_ids) == PROMPT_HI
    assert str(tmp_path) not in sys.path


def test_custom_transform_keeping_columns_merges_them_under_its_output(tmp_path, tok, custom_module):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "hi", "answer": "yo"}])
    cfg = make_cfg(make_spec(path, f"{custom_module}.answer_only"))
    (row,) = load_structured_datasets(cfg, tok, search_dir=tmp_path).train
    assert (row.prompt, row.ground_truth) == ("hi", "YO")
