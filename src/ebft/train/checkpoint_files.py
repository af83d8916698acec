"""A checkpoint's files as data, never as code: the manifest (size and sha256 of every file) written with
each checkpoint and checked before a resume, and readers that turn any damaged or foreign file into one
line naming the checkpoint and the file (docs/guide.md, "Security").

``torch.load`` runs with ``weights_only=True`` only: tensors, numbers, strings, lists, tuples and dicts
load, anything else (a pickled callable, a class) is refused before it can run. Checkpoints therefore
store every state in those forms (``checkpoint.rng_state``, the structured runner's rollout buffer).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ebft.errors import CheckpointError

MANIFEST = "manifest.json"
_CHUNK = 4 * 2**20
_ADVICE = "resume from an earlier checkpoint-N folder, or start the run again in another output_dir"


def problem(directory: Path, name: str, what: str, advice: str = _ADVICE) -> CheckpointError:
    """The one-line error about file ``name`` of checkpoint ``directory``."""
    return CheckpointError(f"resume_from_checkpoint: {Path(directory) / name}: {what}; {advice}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Write ``path`` through a temporary file, flushed to disk, then renamed over it."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_torch(obj, path: Path) -> None:
    """``torch.save`` through a Python file, flushed to disk: a full disk raises OSError(ENOSPC) rather
    than torch's own writer error."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file under ``directory`` in ``directory/manifest.json``."""
    files = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST:
            files[name] = {"size": path.stat().st_size, "sha256": sha256(path)}
    write_json_atomic(Path(directory) / MANIFEST, {"format": 1, "files": files})


def verify_manifest(directory: Path) -> None:
    """Raise ``CheckpointError`` naming the first file of ``directory`` that is missing, of another size or
    another content than its manifest records (sizes first: a truncated file is found without hashing)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        raise problem(
            directory, MANIFEST, "missing (the checkpoint is damaged, or was written by an ebft without manifests)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise problem(directory, MANIFEST, f"unreadable ({type(exc).__name__}: {exc})") from None
    for name, size, _ in entries:
        path = directory / name
        if not path.is_file():
            raise problem(directory, name, "missing (the manifest lists it)")
        if path.stat().st_size != size:
            raise problem(directory, name, f"{path.stat().st_size} bytes, the manifest records {size}: damaged")
    for name, _, digest in entries:
        if sha256(directory / name) != digest:
            raise problem(directory, name, "its content differs from the manifest's sha256: damaged or altered")


def load_torch(directory: Path, name: str):
    """``torch.load(directory/name, weights_only=True)``; any failure is one line naming the file."""
    path = Path(directory) / name
    if not path.is_file():
        raise problem(directory, name, "missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a refused pickle, garbage: all the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise problem(directory, name, f"cannot be read as plain tensors and values ({first})") from None


def load_safetensors(directory: Path, name: str) -> dict:
    try:
        return load_file(Path(directory) / name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise problem(directory, name, f"cannot be read as safetensors ({exc})") from None
