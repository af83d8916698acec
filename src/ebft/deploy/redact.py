"""Uploaded files carry no local absolute paths (docs/guide.md, "Security").

A run's text files name this machine's paths: the resolved ``config.yaml`` and each checkpoint's
``train_config.json`` (the base model, datasets, output folder), PEFT's ``adapter_config.json`` and
adapter card (the base model's folder), the run card. They stay as they are locally (``merge-lora`` and
PEFT read them); what goes to the Hub is a view of the folder in which every absolute path under a
local root is written ``<local>/NAME`` (NAME: its last component, e.g. ``<local>/tiny-llama``). The
roots: every absolute path in the config (and where it resolves to), the output folder, the home folder,
the temporary folder and the working directory. A checkpoint's manifest is rewritten to match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from ebft.config import TrainConfig
from ebft.train.checkpoint_files import MANIFEST

PLACEHOLDER = "<local>"
TEXT_SUFFIXES = frozenset({".json", ".yaml", ".yml", ".md", ".txt", ".jinja"})
_LARGEST_TEXT = 16 * 2**20  # bytes; larger files are data, uploaded as they are
# Characters that end a path inside text (quotes, brackets, whitespace, Markdown table and code marks).
_PATH_CHARS = r"[^\s\"'`<>|()\[\]{},;]*"


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def local_roots(cfg: TrainConfig | None) -> list[str]:
    """The local roots (see the module docstring) for a run of ``cfg`` (None: the machine's roots only)."""
    roots = {str(Path.home()), tempfile.gettempdir(), os.getcwd()}
    if cfg is not None:
        roots.add(str(Path(cfg.output_dir).resolve()))
    for value in _strings(cfg.model_dump(mode="json") if cfg is not None else {}):
        if value.startswith(("/", "~")):
            path = os.path.expanduser(value)
            roots |= {path.rstrip("/"), os.path.realpath(path)}
    return sorted((r for r in roots if r not in ("", "/")), key=len, reverse=True)


class Redactor:
    """Rewrites absolute paths under ``roots`` as ``<local>/NAME``."""

    def __init__(self, roots: Iterable[str]):
        alternatives = "|".join(re.escape(root.rstrip("/")) for root in sorted(set(roots), key=len, reverse=True))
        # A root counts where it starts a path (also after a colon, as in PEFT's `base_model:adapter:/x` tag):
        # not inside a longer path or a URL's path, and ending at a separator.
        self._pattern = re.compile(
            rf"(?<![\w.~/-])(?:{alternatives})(?=$|/|[\s\"'`<>|()\[\]{{}},;])(?:/{_PATH_CHARS})?"
        )

    def text(self, text: str) -> str:
        return self._pattern.sub(lambda m: f"{PLACEHOLDER}/{os.path.basename(m.group(0).rstrip('/'))}", text)

    def value(self, value):
        """A parsed JSON or YAML document with every string rewritten."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def file(self, path: Path) -> bytes | None:
        """The redacted content of ``path``, or None when it is not text or names no local path. JSON and
        YAML are rewritten value by value (so they stay valid), other text as text."""
        if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > _LARGEST_TEXT:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return None
        if self._pattern.search(text) is None:
            return None
        try:
            if path.suffix == ".json":
                return (json.dumps(self.value(json.loads(text)), indent=2, ensure_ascii=False) + "\n").encode()
            if path.suffix in (".yaml", ".yml"):
                document = self.value(yaml.safe_load(text))
                return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=None).encode()
        except (ValueError, yaml.YAMLError):
            pass  # not parseable as its suffix says: redacted as text
        return self.text(text).encode()


@contextmanager
def redacted_view(folder: Path, redactor: Redactor) -> Iterator[Path]:
    """A temporary copy of ``folder`` for uploading: redacted text files, links to everything else."""
    with tempfile.TemporaryDirectory(prefix="ebft-upload-") as tmp:
        view = Path(tmp)
        changed: dict[str, bytes] = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            target = view / name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = redactor.file(path)
            if data is None:
                os.symlink(path.resolve(), target)
            else:
                target.write_bytes(data)
                changed[name] = data
        for manifest in view.rglob(MANIFEST):
            _match_manifest(view, manifest, changed)
        yield view


def _match_manifest(view: Path, manifest: Path, changed: dict[str, bytes]) -> None:
    """Rewrite a checkpoint's manifest for the redacted files of its folder."""
    prefix = manifest.parent.relative_to(view).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    data = json.loads(manifest.read_text(encoding="utf-8"))
    files = data.get("files", {})
    touched = False
    for name, entry in files.items():
        if (prefix + name) in changed:
            content = changed[prefix + name]
            entry.update(size=len(content), sha256=hashlib.sha256(content).hexdigest())
            touched = True
    if touched:
        manifest.unlink()
        manifest.write_text(json.dumps(data, indent=2), encoding="utf-8")
