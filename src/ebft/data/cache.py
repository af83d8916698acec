"""``dataset_prepared_path``: the tokenised, transformed and split rows of a config, cached on disk.

Preparing the data (reading, transforming, tokenising, packing, checking every row, holding out the
validation rows) runs once per distinct input; the next run with the same inputs reads the result back.
The entry's name is a hash of everything that changes the rows:

* each dataset entry as configured, and for local data each file's path, size and modification time;
* the transform's source file (a built-in or your own module), and this ebft version;
* the tokenizer, as the hash of its saved files (vocabulary, special tokens, chat template);
* the lengths and mode keys the rows are checked against (``sequence_len``; strided: ``ebft.stride``,
  ``context_length``, ``generate_max_len``, ``min_completion_prefix``; structured:
  ``trl.max_completion_length``, ``trl.chat_template_kwargs``), and ``val_set_size`` with ``seed``.

Hub datasets are keyed by their id, name, split and files as written: a new upstream revision is not
noticed (delete the folder to prepare them again). An entry is a folder ``<dataset_prepared_path>/<hash>``
written under a temporary name and renamed when complete, with ``ebft_prepared.json`` (what it was made
from, row counts) written last; an entry that cannot be read back is prepared again, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ebft
from ebft.config import TrainConfig
from ebft.data.fingerprint import source_digest, tokenizer_digest
from ebft.data.load import StridedData, load_strided_datasets, local_files
from ebft.data.structured import PromptRow, StructuredData, load_structured_datasets
from ebft.data.transforms import resolve_transform

log = logging.getLogger("ebft")

MANIFEST = "ebft_prepared.json"
# Where `ebft preprocess` prepares the rows of a config without dataset_prepared_path (axolotl's default).
DEFAULT_PREPARED_PATH = "last_run_prepared"
# Bumped when the stored layout changes.
FORMAT = 1


def cached(load):
    """A mode's loader ``load(cfg, tokenizer, search_dir=...) -> StridedData | StructuredData`` that reads its rows
    from ``dataset_prepared_path`` when it holds them for these inputs, and saves them there when it does not
    (with the key unset, ``load`` itself)."""

    def load_cached(cfg: TrainConfig, tokenizer, *, search_dir: str | Path | None = None):
        if cfg.dataset_prepared_path is None:
            return load(cfg, tokenizer, search_dir=search_dir)
        digest, inputs = cache_key(cfg, tokenizer, search_dir)
        entry = Path(cfg.dataset_prepared_path).expanduser() / digest
        if (entry / MANIFEST).is_file():
            try:
                data = _read(entry, cfg.ebft.mode)
            except Exception as exc:  # noqa: BLE001 - whatever a damaged entry raises, it is prepared again
                log.warning(
                    "dataset_prepared_path: the prepared rows in %s cannot be read (%s: %s); preparing them again",
                    entry,
                    type(exc).__name__,
                    exc,
                )
                shutil.rmtree(entry, ignore_errors=True)
            else:
                log.info("dataset_prepared_path: reusing the prepared rows in %s (%s)", entry, _counts(data))
                return data
        log.info("dataset_prepared_path: no prepared rows for these inputs yet; preparing them into %s", entry)
        data = load(cfg, tokenizer, search_dir=search_dir)
        _write(entry, data, cfg.ebft.mode, inputs)
        return data

    return load_cached


load_strided = cached(load_strided_datasets)
load_structured = cached(load_structured_datasets)


def load_datasets(cfg: TrainConfig, tokenizer, *, search_dir: str | Path | None = None):
    """The rows of ``cfg``'s mode (``StridedData`` or ``StructuredData``), through ``dataset_prepared_path``."""
    load = load_strided if cfg.ebft.mode == "strided" else load_structured
    return load(cfg, tokenizer, search_dir=search_dir)


def cache_key(cfg: TrainConfig, tokenizer, search_dir: str | Path | None = None) -> tuple[str, dict]:
    """(hex digest, the inputs it hashes) for ``cfg``'s prepared rows (see the module docstring)."""
    e = cfg.ebft
    if e.mode == "strided":
        lengths = {k: getattr(e, k) for k in ("stride", "context_length", "generate_max_len", "min_completion_prefix")}
    else:
        lengths = {
            "max_completion_length": cfg.trl.max_completion_length,
            "chat_template_kwargs": cfg.trl.chat_template_kwargs,
        }
    inputs = {
        "format": FORMAT,
        "ebft": ebft.__version__,
        "mode": e.mode,
        "datasets": [_dataset_inputs(spec, search_dir) for spec in cfg.datasets],
        "tokenizer": tokenizer_digest(tokenizer),
        "sequence_len": cfg.sequence_len,
        **lengths,
        "val_set_size": cfg.val_set_size,
        "seed": cfg.seed,
    }
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], inputs


def _dataset_inputs(spec, search_dir) -> dict:
    out = {"spec": spec.model_dump(mode="json")}
    local = Path(spec.path).expanduser()
    if local.exists():
        _, files = local_files(local, spec.data_files, spec.path)
        out["files"] = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    if spec.type is not None:
        out["transform"] = source_digest(resolve_transform(spec.type, search_dir))
    return out


def _counts(data) -> str:
    val = 0 if data.val is None else len(data.val)
    return f"{len(data.train)} training rows, {val} validation rows, {data.skipped} skipped"


def _write(entry: Path, data, mode: str, inputs: dict) -> None:
    """Save ``data`` as ``entry`` (a temporary folder renamed into place; if another process got there first,
    its entry stands)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        for split in ("train", "val"):
            rows = getattr(data, split)
            if rows is None:
                continue
            if mode == "strided":
                rows.save_to_disk(str(tmp / split))
            else:
                lines = (json.dumps(dataclasses.asdict(row), ensure_ascii=False) + "\n" for row in rows)
                (tmp / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        manifest = {
            "inputs": inputs,
            "train_rows": len(data.train),
            "val_rows": None if data.val is None else len(data.val),
            "skipped": data.skipped,
            "first_skip_reason": data.first_skip_reason,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote the same entry meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dataset_prepared_path: saved %s in %s", _counts(data), entry)


def _read(entry: Path, mode: str):
    manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    splits: dict[str, Any] = {}  # a datasets.Dataset (strided) or a list of PromptRow, None when absent
    for split, expected in (("train", manifest["train_rows"]), ("val", manifest["val_rows"])):
        if expected is None:
            splits[split] = None
            continue
        if mode == "strided":
            from datasets import load_from_disk

            rows = load_from_disk(str(entry / split))
        else:
            text = (entry / f"{split}.jsonl").read_text(encoding="utf-8")
            rows = [_prompt_row(json.loads(line)) for line in text.splitlines()]
        if len(rows) != expected:
            raise ValueError(f"{split} holds {len(rows)} rows, the manifest says {expected}")
        splits[split] = rows
    made = StridedData if mode == "strided" else StructuredData
    return made(splits["train"], splits["val"], manifest["skipped"], manifest["first_skip_reason"])


def _prompt_row(fields: dict) -> PromptRow:
    for name in ("remaining_turns", "prompt_ids", "gt_ids", "tests"):
        fields[name] = tuple(fields[name])
    return PromptRow(**fields)
