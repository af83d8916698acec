"""Content hashes of what turns raw rows into token rows: a tokenizer, and the source of a function.

They key both on-disk caches of the data: ``dataset_prepared_path`` (``ebft.data.cache``) and the
``datasets`` library's cache of each transform's map (``ebft.data.rows``).
"""

from __future__ import annotations

import hashlib
import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path


def tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's saved files: two tokenizers that save the same files tokenise the same."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="ebft-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def source_digest(fn: Callable) -> str:
    """A hash of the file that defines ``fn`` (its module's source), or of its qualified name when it has none
    (a builtin, or code typed into an interpreter)."""
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        source = None
    if source is not None and Path(source).is_file():
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(name.encode()).hexdigest()
