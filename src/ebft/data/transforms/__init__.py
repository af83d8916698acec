"""Dataset transforms: ``type: module.function`` in a dataset entry.

A transform is a factory ``transform(cfg, **kwargs) -> (fn, options)``; ``cfg`` is the run's
:class:`~ebft.config.TrainConfig` and ``kwargs`` holds ``dataset``, the entry's :class:`~ebft.config.DatasetSpec`.
``fn(example, tokenizer=None)``
maps one raw row (or, with ``options["batched"]``, a dict of columns) to token fields (strided mode)
or to ``prompt``/``ground_truth`` fields (structured mode). ``options``:

- ``remove_columns``: ``"__all__"`` drops every original column, a list drops the listed ones that
  exist, absent keeps them all;
- ``batched``: ``fn`` receives and returns columns (it may return more or fewer rows than it got);
- ``pack_length``: join the documents ``fn`` produced with one separator token and cut the stream into
  chunks of this many tokens;
- ``end_length``: (instead of ``pack_length``) end each document with the separator token and cut it to
  this many tokens;
- ``pack_separator``: the separator, a token or a token id; default the dataset entry's
  ``document_separator``, else the tokenizer's end-of-document token (``ebft.data.separator``).

The built-in names resolve to the modules of this package, so configs written for axolotl load
unchanged: strided ``ebft_pretrain``, ``ebft_strided_structured``, ``ebft_strided_chat``, and
structured (rows of ``prompt``/``ground_truth``) ``ebft_opencode``, ``ebft_chat_multiturn``,
``ebft_reasoning``. Any other module is imported from ``sys.path`` (plus an optional search folder,
normally the config file's folder).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ebft.errors import DataError

BUILTIN_MODULES = (
    "ebft_pretrain",
    "ebft_strided_structured",
    "ebft_strided_chat",
    "ebft_opencode",
    "ebft_chat_multiturn",
    "ebft_reasoning",
)

# axolotl transforms that this version does not ship, with what to use instead; named here so that
# such a config fails with that advice rather than with "module has no function".
UNAVAILABLE = {
    "ebft_reasoning.transform_strided": "use ebft_strided_chat.transform, which labels every assistant turn",
}


def resolve_transform(type_name: str, search_dir: str | Path | None = None) -> Callable:
    """The transform factory named by ``type_name`` (``module.function``)."""
    if type_name in UNAVAILABLE:
        raise DataError(f"dataset type '{type_name}' is not available in this version; {UNAVAILABLE[type_name]}")
    module_name, _, attr = type_name.rpartition(".")
    if not module_name or not attr:
        raise DataError(
            f"dataset type '{type_name}' is not of the form 'module.function' "
            f"(built-in: {', '.join(m + '.transform' for m in BUILTIN_MODULES)})"
        )
    if module_name in BUILTIN_MODULES:
        module_name = f"{__name__}.{module_name}"
    module = _import(module_name, type_name, search_dir)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise DataError(f"dataset type '{type_name}': module '{module_name}' has no function '{attr}'")
    return factory


def _import(module_name: str, type_name: str, search_dir: str | Path | None) -> ModuleType:
    # The config's folder goes on sys.path only for this import, so that a transform file next to
    # the config is found without leaving the process's import path changed afterwards.
    entry = str(Path(search_dir).resolve()) if search_dir is not None else None
    added = entry if entry is not None and entry not in sys.path else None
    if added is not None:
        sys.path.insert(0, added)
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module_name)
    except ImportError as exc:
        where = f" or in {entry}" if entry else ""
        raise DataError(
            f"dataset type '{type_name}': cannot import module '{module_name}' ({exc}); it is neither "
            f"a built-in transform ({', '.join(BUILTIN_MODULES)}) nor importable from sys.path{where}"
        ) from exc
    except Exception as exc:
        raise DataError(
            f"dataset type '{type_name}': importing module '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if added is not None:
            sys.path.remove(added)
