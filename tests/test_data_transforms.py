"""Strided-mode transforms: prompt/completion rows, chats with every assistant turn labelled, and pretraining
documents packed with one EOS between them.
"""

from __future__ import annotations

import logging

import pytest
from data_builders import BOS, EOS, SPECIAL_DOCS, make_cfg, make_spec, write_jsonl

from ebft.data.load import load_strided_datasets
from ebft.data.transforms import ebft_pretrain, ebft_strided_chat, ebft_strided_structured


@pytest.fixture(scope="session")
def bos_tokenizer(tiny_model_dir):
    """The tiny tokenizer with BOS added by ``add_special_tokens=True`` (like Llama's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, add_bos_token=True)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- ebft_strided_structured -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_key", "completion_key"), [("input", "output"), ("prompt", "completion"), ("question", "answer")]
)
def test_structured_prompt_with_bos_completion_with_eos(bos_tokenizer, prompt_key, completion_key):
    fn, options = ebft_strided_structured.transform(make_cfg(sequence_len=64))
    assert options == {"remove_columns": "__all__"}
    row = fn({prompt_key: "def add(a, b):", completion_key: "return a + b"}, tokenizer=bos_tokenizer)
    prompt = encode(bos_tokenizer, "def add(a, b):")
    completion = encode(bos_tokenizer, "return a + b")
    # BOS + prompt tokens, unlabelled; completion tokens + EOS, labelled.
    assert row["input_ids"] == [BOS, *prompt, *completion, EOS]
    assert row["prompt_length"] == 1 + len(prompt)
    assert row["labels"] == [-100] * (1 + len(prompt)) + [*completion, EOS]


def test_structured_truncation_cuts_the_completion_first(bos_tokenizer):
    prompt = encode(bos_tokenizer, "def add(a, b):")
    completion = encode(bos_tokenizer, "return a + b")
    assert len(completion) >= 3
    sequence_len = 1 + len(prompt) + 2  # room for BOS, the prompt and two completion tokens
    fn, _ = ebft_strided_structured.transform(make_cfg(sequence_len=sequence_len))
    row = fn({"input": "def add(a, b):", "output": "return a + b"}, tokenizer=bos_tokenizer)
    assert row["input_ids"] == [BOS, *prompt, *completion[:2]]  # EOS cut with the completion's end
    assert row["labels"] == [-100] * (1 + len(prompt)) + completion[:2]
    assert row["prompt_length"] == 1 + len(prompt)


def test_structured_prompt_too_long_is_an_error_not_a_cut(bos_tokenizer):
    prompt_tokens = 1 + len(encode(bos_tokenizer, "def add(a, b):"))
    fn, _ = ebft_strided_structured.transform(make_cfg(sequence_len=prompt_tokens))
    with pytest.raises(ValueError, match=f"prompt has {prompt_tokens} tokens"):
        fn({"input": "def add(a, b):", "output": "x"}, tokenizer=bos_tokenizer)
    with pytest.raises(ValueError, match="no completion column"):
        fn({"input": "def add(a, b):"}, tokenizer=bos_tokenizer)


# --- ebft_strided_chat -------------------------------------------------------------------------

CHAT = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo there"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "ok"},
]


def chat_pieces(tokenizer):
    """The conversation as the scratch template renders it, cut at turn boundaries: (ids, labelled)."""
    pieces = [
        ("<|user|>\nhi</s>\n<|assistant|>\n", False),
        ("yo there</s>\n", True),  # the assistant's content and its end-of-turn marker
        ("<|user|>\nmore</s>\n<|assistant|>\n", False),
        ("ok</s>\n", True),
    ]
    return [(encode(tokenizer, text), labelled) for text, labelled in pieces]


def test_chat_labels_every_assistant_turn(tiny_tokenizer):
    fn, options = ebft_strided_chat.transform(make_cfg(sequence_len=256))
    assert options == {"remove_columns": "__all__"}
    row = fn({"messages": CHAT}, tokenizer=tiny_tokenizer)
    pieces = chat_pieces(tiny_tokenizer)
    assert row["input_ids"] == [t for ids, _ in pieces for t in ids]
    assert row["labels"] == [t if labelled else -100 for ids, labelled in pieces for t in ids]
    assert row["prompt_length"] == len(pieces[0][0])
    assert tiny_tokenizer.decode([t for t in row["labels"] if t != -100]) == "yo there</s>\nok</s>\n"


def test_chat_accepts_sharegpt_conversations_and_truncates(tiny_tokenizer):
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT]
    full, _ = ebft_strided_chat.transform(make_cfg(sequence_len=256))
    reference = full({"messages": CHAT}, tokenizer=tiny_tokenizer)
    cut = reference["prompt_length"] + 3
    fn, _ = ebft_strided_chat.transform(make_cfg(sequence_len=cut))
    row = fn({"conversations": sharegpt}, tokenizer=tiny_tokenizer)
    assert row["input_ids"] == reference["input_ids"][:cut]
    assert row["labels"] == reference["labels"][:cut]
    assert row["prompt_length"] == reference["prompt_length"]


def test_chat_rows_without_a_usable_answer_fail(tiny_tokenizer):
    fn, _ = ebft_strided_chat.transform(make_cfg(sequence_len=256))
    with pytest.raises(ValueError, match="no assistant turn"):
        fn({"messages": [{"role": "user", "content": "hi"}]}, tokenizer=tiny_tokenizer)
    short, _ = ebft_strided_chat.transform(make_cfg(sequence_len=3))
    with pytest.raises(ValueError, match="beyond sequence_len=3"):
        short({"messages": CHAT}, tokenizer=tiny_tokenizer)


# --- ebft_pretrain: packing and pack: false ----------------------------------------------------


def test_pretrain_packs_documents_with_one_eos_between(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SPECIAL_DOCS])
    cfg = make_cfg(make_spec(path, "ebft_pretrain.transform"), sequence_len=4)
    data = load_strided_datasets(cfg, tiny_tokenizer)
    # stream = [4,5,6] + EOS + [6] + EOS + [4,4,5,5] = 10 tokens -> chunks of 4, 4 and the last 2.
    assert data.train["input_ids"] == [[4, 5, 6, EOS], [6, EOS, 4, 4], [5, 5]]
    assert data.train["labels"] == data.train["input_ids"]
    assert data.train["prompt_length"] == [None, None, None]
    assert data.skipped == 0
    assert data.val is None


def test_pretrain_packing_matches_the_tokenizer_on_real_text(tmp_path, tiny_tokenizer):
    texts = ["import os\nprint(os.getcwd())\n", "def f(x):\n    return x * 2\n", "class A:\n    pass\n"]
    path = write_jsonl(tmp_path / "code.jsonl", [{"content": t} for t in texts])
    cfg = make_cfg(make_spec(path, "ebft_pretrain.transform"), sequence_len=8)
    data = load_strided_datasets(cfg, tiny_tokenizer)
    docs = [encode(tiny_tokenizer, t) for t in texts]
    stream = docs[0] + [EOS] + docs[1] + [EOS] + docs[2]
    assert stream.count(EOS) == 2
    assert [t for chunk in data.train["input_ids"] for t in chunk] == stream
    sizes = [len(chunk) for chunk in data.train["input_ids"]]
    assert sizes == [8] * (len(stream) // 8) + ([len(stream) % 8] if len(stream) % 8 else [])


def test_pretrain_short_last_chunk_is_skipped_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in SPECIAL_DOCS])
    # A block needs context_length 2 + generate_max_len 1 = 3 tokens; the last chunk [5, 5] has 2.
    cfg = make_cfg(make_spec(path, "ebft_pretrain.transform"), sequence_len=4, context_length=2)
    with caplog.at_level(logging.WARNING, logger="ebft"):
        data = load_strided_datasets(cfg, tiny_tokenizer)
    assert data.train["input_ids"] == [[4, 5, 6, EOS], [6, EOS, 4, 4]]
    assert data.skipped == 1
    assert data.first_skip_reason == (
        f"dataset '{path}', packed chunk 2: no strided block fits: 2 tokens, but the first block needs 3 "
        "(first anchor 2 + generate_max_len 1)"
    )
    assert [r.getMessage() for r in caplog.records if r.name == "ebft"] == [
        f"Skipped 1 unusable rows of '{path}' for strided training; first: {data.first_skip_reason}"
    ]


def test_pretrain_without_packing_keeps_one_row_per_document(tmp_path, tiny_tokenizer):
    rows = [{"body": t, "text": "ignored"} for t in SPECIAL_DOCS]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    cfg = make_cfg(make_spec(path, "ebft_pretrain.transform", pack=False, field="body"), sequence_len=4)
    data = load_strided_datasets(cfg, tiny_tokenizer)
    # tokens + EOS cut to 4: the third document (4 tokens) loses its EOS.
    assert data.train["input_ids"] == [[4, 5, 6, EOS], [6, EOS], [4, 4, 5, 5]]
    assert data.train["labels"] == data.train["input_ids"]
    assert data.train.column_names == ["input_ids", "labels", "prompt_length"]


def test_pretrain_options_declare_packing():
    spec = make_spec("x", "ebft_pretrain.transform")
    _, packed = ebft_pretrain.transform(make_cfg(sequence_len=16), dataset=spec)
    assert packed == {"remove_columns": "__all__", "batched": True, "pack_length": 16}
    spec.pack = False
    _, unpacked = ebft_pretrain.transform(make_cfg(sequence_len=16), dataset=spec)
    assert unpacked == {"remove_columns": "__all__", "batched": True, "end_length": 16}
