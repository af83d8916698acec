"""Shared fixtures: a tiny Llama model and BPE tokenizer built offline from the stdlib sources, and the training
data files several test modules read."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import sysconfig
from pathlib import Path

import pytest
from fake_vllm import FakeVLLMServer


def stdlib_texts(limit: int = 40) -> list[str]:
    """Real code on every machine: the first ``limit`` modules of this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` and return it."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def long_texts() -> list[str]:
    """Stdlib modules of at least 2000 characters (hundreds of tokens each), capped to keep tokenizing fast."""
    return [text[:6000] for text in stdlib_texts(16) if len(text) >= 2000]


def snippets() -> list[tuple[str, str]]:
    """(first line, a few following lines) of stdlib modules: short questions and answers."""
    out = []
    for text in stdlib_texts(24):
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) >= 6:
            out.append((lines[0][:50], "\n".join(lines[1:4])[:120]))
    return out[:12]


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


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Strided training documents: long stdlib modules (a module that needs others defines its own)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": t} for t in long_texts()])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Structured-mode training data: pairs, chats, reasoning chats and custom rows built from stdlib snippets."""
    d = tmp_path_factory.mktemp("structured-data")
    pairs = snippets()
    write_jsonl(d / "pairs.jsonl", [{"input": q, "output": a} for q, a in pairs])

    def u(text):
        return {"role": "user", "content": text}

    def a(text):
        return {"role": "assistant", "content": text}

    # Conversations of different lengths; every user message is unique (marker words) so that a rolled-out
    # conversation shows which row it belongs to.
    chats = []
    for i, (q, ans) in enumerate(pairs[:8]):
        turns = i % 3  # 0, 1 or 2 further exchanges
        messages = [u(f"q{i}a {q}"), a(ans[:60])]
        for t in range(turns):
            messages += [u(f"q{i}{'bc'[t]} more"), a(ans[-40:])]
        if i % 4 == 1:
            messages.insert(0, {"role": "system", "content": "be short"})
        chats.append({"messages": messages})
    write_jsonl(d / "chat.jsonl", chats)

    reasoning = []
    for i, (q, ans) in enumerate(pairs[:8]):
        messages = [u(f"why {q}"), a(f"<think>\nthe line is {q[:20]}\n</think>\n\n{ans[:50]}")]
        if i % 2:
            messages = [u("hello"), a("<think>greet</think>hi"), *messages]
        reasoning.append({"messages": messages})
    write_jsonl(d / "reasoning.jsonl", reasoning)

    write_jsonl(d / "custom.jsonl", [{"question": q, "answer": ans} for q, ans in pairs])
    return d


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The fake vLLM server (tests/fake_vllm.py) serving the tiny model, one per test module."""
    with FakeVLLMServer(tiny_model_dir) as fake:
        yield fake


@pytest.fixture
def fake(server):
    """The module's fake vLLM server with its records and failure knobs reset before and after the test."""
    server.reset()
    yield server
    server.reset()


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_configure(config):
    """Ctrl-C as a terminal delivers it. A shell without job control starts a background command (``pytest &``)
    with SIGINT ignored, which its children inherit and Python then keeps: tests/test_signals.py's SIGINT cases
    would test the environment, not ebft. Restore Python's handler in this process, and so the default in the
    commands it starts."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's verdict, once every report is written, without interpreter teardown.

    The weight-transfer tests join gloo groups over TCP stores inside this process (the fake vLLM server's
    worker threads); torch's C++ store threads left from them can call std::terminate while the interpreter
    finalises, turning a finished run (every result already reported) into SIGABRT.
    """
    if _EXIT_STATUS in config.stash:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(config.stash[_EXIT_STATUS])
