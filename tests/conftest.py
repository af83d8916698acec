"""Shared fixtures: a tiny Llama model and BPE tokenizer built offline from the stdlib sources."""

from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

import pytest


def stdlib_texts(limit: int = 40) -> list[str]:
    """Real code on every machine: the first ``limit`` modules of this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def build_tiny_model(out: Path) -> Path:
    """The tiny Llama and its BPE tokenizer, saved under ``out``; returns the model folder."""
    from ebft.quickstart.scratch import build_model_dir

    return build_model_dir(out, stdlib_texts(), vocab_size=384, seed=0, hidden_size=64, num_layers=4)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # tests/mutation/run.py starts one pytest per mutant; it builds the folder once with build_tiny_model and
    # names it here instead of having every run train the same tokenizer again.
    prebuilt = os.environ.get("EBFT_TEST_TINY_MODEL_DIR")
    if prebuilt:
        return Path(prebuilt)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _reset_ebft_logger():
    """``main`` configures the ``ebft`` logger (rich handler, no propagation). Every test starts from the
    unconfigured logger, also when a module-scoped fixture ran ``main`` before this fixture could act."""
    logger = logging.getLogger("ebft")
    logger.handlers.clear()
    logger.propagate, logger.level = True, logging.NOTSET
    yield
    logger.handlers.clear()
    logger.propagate, logger.level = True, logging.NOTSET


@pytest.fixture(scope="session", autouse=True)
def _datasets_logging_outside_capsys():
    """datasets' log handler writes to the sys.stderr of its first use; make that pytest's session stream.

    Created under ``capsys`` it would keep that test's stream, closed afterwards, and a later datasets
    log line would print logging's own "--- Logging error ---" traceback into another test's stderr.
    """
    from datasets.utils import logging as datasets_logging

    datasets_logging.get_logger()
