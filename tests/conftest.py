"""Shared fixtures: a tiny Llama model and BPE tokenizer built offline from the stdlib sources."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest


def stdlib_texts(limit: int = 40) -> list[str]:
    """Real code on every machine: the first ``limit`` modules of this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ebft.scratch import build_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    return build_model_dir(out, stdlib_texts(), vocab_size=384, seed=0, hidden_size=64, num_layers=4)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
