"""Optional packages (wandb, tensorboard, bitsandbytes, gguf, flash-attn, vllm): whether one can be imported,
found without importing it (importing wandb or vllm takes seconds)."""

from __future__ import annotations

import importlib.util
import sys


def package_available(name: str) -> bool:
    """Whether ``import name`` would find the package. A ``None`` entry in ``sys.modules`` (Python's way of
    blocking an import) counts as absent."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
