"""Shared builders of the strided data tests: data configs and dataset specs, and JSONL files."""

from __future__ import annotations

import json
from types import SimpleNamespace

BOS, EOS, PAD, USER, ASSISTANT, SYSTEM = 0, 1, 2, 4, 5, 6
# Documents made of special tokens, so that their ids are known without running the BPE.
SPECIAL_DOCS = ["<|user|><|assistant|><|system|>", "<|system|>", "<|user|><|user|><|assistant|><|assistant|>"]


def make_cfg(
    *datasets,
    sequence_len=64,
    val_set_size=0.0,
    seed=0,
    context_length=1,
    stride=1,
    generate_max_len=1,
    min_completion_prefix=0,
):
    """The parts of a training config the strided data loader reads."""
    ebft = SimpleNamespace(
        context_length=context_length,
        stride=stride,
        generate_max_len=generate_max_len,
        min_completion_prefix=min_completion_prefix,
    )
    return SimpleNamespace(
        datasets=list(datasets), sequence_len=sequence_len, val_set_size=val_set_size, seed=seed, ebft=ebft
    )


def make_spec(path, type=None, **overrides):
    """A dataset spec for path with every optional field unset; keyword arguments replace fields."""
    fields = {
        "path": str(path),
        "type": type,
        "split": "train",
        "data_files": None,
        "name": None,
        "field": None,
        "pack": None,
    }
    return SimpleNamespace(**{**fields, **overrides})


def write_jsonl(path, rows):
    """Write rows as JSON lines to path and return it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
