"""The quickstart's corpus: this Python's standard-library sources, split into training and held-out
files by a hash of their path (deterministic, independent of which other files exist)."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ebft.errors import EbftError

# Corpus. Files over this size are generated tables (pydoc topics, decimal tables), not code; the
# encodings package is mostly generated character maps. Tests and installed packages are not stdlib.
MAX_FILE_BYTES = 200_000
EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
HELD_OUT_PERCENT = 10


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib folder, posix style
    text: str


def is_held_out(relative_path: str) -> bool:
    """A file is held out when the hash of its path falls in the first HELD_OUT_PERCENT of 100 buckets."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < HELD_OUT_PERCENT


def stdlib_corpus(root: str | Path | None = None) -> tuple[list[SourceFile], list[SourceFile]]:
    """(training files, held-out files) of the standard library at ``root`` (default: this Python's)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train: list[SourceFile] = []
    held_out: list[SourceFile] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        item = SourceFile(rel.as_posix(), text)
        (held_out if is_held_out(item.path) else train).append(item)
    if not train or not held_out:
        raise EbftError(f"{root}: found too few Python files for a train/held-out split")
    return train, held_out


def within_budget(files: list[SourceFile], chars: int) -> list[SourceFile]:
    """The files in a fixed pseudo-random order (by path hash) until ``chars`` characters are reached.

    A short budget then trains on a small, still varied slice of the library instead of tokenizing all
    of it for a few steps; at the default budget every file is kept.
    """
    order = sorted(files, key=lambda f: hashlib.sha256(f.path.encode("utf-8")).hexdigest())
    kept, total = [], 0
    for item in order:
        if total >= chars:
            break
        kept.append(item)
        total += len(item.text)
    return sorted(kept, key=lambda f: f.path)


def write_jsonl(path: Path, files: list[SourceFile]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for item in files:
            handle.write(json.dumps({"text": item.text, "path": item.path}) + "\n")
    return path
