"""Load datasets for strided mode: raw rows -> transform -> (packing) -> usable token rows.

``load_raw`` reads one dataset entry (hub id, local file or local folder; any split slice).
``load_strided_datasets`` runs every entry through its transform, drops the rows that strided
training cannot use (the transform failed, the output is malformed, or no block fits), reports them,
and splits off a held-out set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ebft.config import TrainConfig
from ebft.data.packing import end_documents, pack_documents
from ebft.data.rows import ERROR, ROW, TOKEN_COLUMNS, apply_transform, block_errors
from ebft.data.separator import document_separator
from ebft.data.transforms import resolve_transform
from ebft.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("ebft")

# Lines this process has logged already (see _log_once).
_said: set[str] = set()

# File extension -> datasets builder. A .txt file is one document (one row), not one row per line.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class StridedData:
    """Token rows (``input_ids``, ``labels``, ``prompt_length`` or null) ready for ``collate_documents``."""

    train: Dataset
    val: Dataset | None
    skipped: int
    first_skip_reason: str | None


def load_raw(spec) -> Dataset:
    """The rows of one dataset entry (``path``, ``split``, ``data_files``, ``name``) before any transform."""
    from datasets import load_dataset

    path = str(spec.path)
    split = getattr(spec, "split", None) or "train"
    data_files = getattr(spec, "data_files", None)
    name = getattr(spec, "name", None)
    local = Path(path).expanduser()
    if local.exists():
        if name is not None:
            raise DataError(f"dataset '{path}': 'name' selects a hub dataset configuration; this is a local path")
        builder, files = local_files(local, data_files, path)
        args: tuple = (builder,)
        # Local files form a single split called "train"; slices such as train[:10%] apply to it.
        kwargs: dict = {"data_files": files, "split": split}
        if builder == "text":
            kwargs["sample_by"] = "document"
    elif looks_local(path):
        raise DataError(f"dataset '{path}': no such file or folder")
    else:
        args = (path, name)
        kwargs = {"split": split, "data_files": data_files}
    from datasets.exceptions import DatasetGenerationError

    # datasets raises many exception types here (ValueError, FileNotFoundError, ConnectionError, ...).
    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:
        # DatasetGenerationError only says that generation failed; its cause says why and where, e.g.
        # "ArrowInvalid: JSON parse error: Invalid value. in row 1".
        cause = exc.__cause__ if isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None else exc
        raise DataError(f"dataset '{path}' (split '{split}'): {type(cause).__name__}: {cause}") from exc


def looks_local(path: str) -> bool:
    """Whether a dataset path can only mean a local file (a path, or a data file's extension), not a hub id."""
    return path.startswith(("/", ".", "~")) or Path(path).suffix.lower() in BUILDERS


def local_files(local: Path, data_files, path: str) -> tuple[str, list[str]]:
    """(datasets builder, files) of a local dataset entry; DataError says what is missing or unreadable."""
    if local.is_file():
        if data_files:
            raise DataError(f"dataset '{path}': data_files selects files in a folder or hub dataset, not in a file")
        files = [local]
    elif data_files:
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
        files = sorted({p for pattern in patterns for p in local.glob(pattern) if p.is_file()})
        if not files:
            raise DataError(f"dataset '{path}': data_files {patterns} match no file in the folder")
    else:
        files = sorted(
            p
            for p in local.rglob("*")
            if p.is_file()
            and p.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(local).parts)
        )
        if not files:
            raise DataError(f"dataset '{path}': the folder has no {'/'.join(sorted(BUILDERS))} files")
    for p in files:
        if p.suffix.lower() not in BUILDERS:
            raise DataError(
                f"dataset '{path}': unsupported file type '{p.suffix}' ({p.name}); "
                f"supported: {', '.join(sorted(BUILDERS))}"
            )
    empty = [p.name for p in files if p.stat().st_size == 0]
    if empty:
        raise DataError(f"dataset '{path}': empty file(s) {empty}")
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise DataError(f"dataset '{path}': the folder mixes file types {sorted(builders)}; keep one type per entry")
    return builders.pop(), [str(p) for p in files]


def load_strided_datasets(cfg: TrainConfig, tokenizer, *, search_dir: str | Path | None = None) -> StridedData:
    """Usable token rows of every ``cfg.datasets`` entry, with ``val_set_size`` held out.

    ``search_dir`` (normally the config file's folder) is where custom transform modules are looked up
    besides ``sys.path``. Unusable rows are counted in ``skipped`` and the first one is named in a
    warning and in ``first_skip_reason``; a DataError is raised when no row is left.
    """
    from datasets import concatenate_datasets

    skips = _Skips()
    parts = []
    for index, spec in enumerate(cfg.datasets):
        raw = load_raw(spec)
        fn, options = _transform_for(spec, cfg, search_dir)
        announce(spec, len(raw))
        made_from = json.dumps({"spec": _plain(spec), "config": _plain(cfg)}, sort_keys=True, default=str)
        rows = apply_transform(raw, fn, options, tokenizer, desc=f"Tokenizing {spec.path}", context=made_from)
        unit = "row"
        if options.get("pack_length") is not None or options.get("end_length") is not None:
            rows = skips.drop(rows, rows[ERROR], spec.path, unit)
            separator = _separator(spec, index, options, tokenizer).token_id
            if options.get("pack_length") is not None:
                rows = pack_documents(rows, int(options["pack_length"]), separator)
                unit = "packed chunk"
            else:
                rows = end_documents(rows, int(options["end_length"]), separator)
        errors = _with_block_errors(rows, cfg)
        rows = skips.drop(rows, errors, spec.path, unit)
        parts.append(rows.select_columns(list(TOKEN_COLUMNS)))

    data = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    paths = ", ".join(f"'{spec.path}'" for spec in cfg.datasets)
    if skips.count:
        logger.warning(
            "Skipped %d unusable rows of %s for strided training; first: %s", skips.count, paths, skips.first
        )
    if len(data) == 0:
        if skips.count == 0:
            raise DataError(f"no rows to train on: {paths} yielded no rows")
        raise DataError(f"no rows to train on: all {skips.count} rows of {paths} were skipped; first: {skips.first}")
    train, val = split_validation(data, cfg.val_set_size, cfg.seed)
    return StridedData(train=train, val=val, skipped=skips.count, first_skip_reason=skips.first)


def _separator(spec, index: int, options: dict, tokenizer):
    """The token that ends each document of ``spec`` (``ebft.data.separator``), logged."""

    configured = getattr(spec, "document_separator", None)
    key = f"datasets.{index}.document_separator"
    if configured is None and options.get("pack_separator") is not None:
        configured, key = options["pack_separator"], f"dataset '{spec.path}': transform option pack_separator"
    chosen = document_separator(tokenizer, configured, key=key)
    _log_once(f"dataset '{spec.path}': documents end with {chosen.token!r} (id {chosen.token_id}; {chosen.source})")
    return chosen


def announce(spec, rows: int) -> None:
    """The start line of a dataset's preparation (a large one takes minutes)."""
    _log_once(f"dataset '{spec.path}': {rows} rows read; transforming and tokenizing ({spec.type or 'no transform'})")


def _log_once(line: str) -> None:
    """Log ``line`` unless this process already has: the quickstart and evaluation prepare the same data
    several times, and the same line ten times says nothing new."""
    if line not in _said:
        _said.add(line)
        logger.info(line)


def _pretokenized(example: dict, tokenizer=None) -> dict:
    """No ``type``: the rows already hold ``input_ids``/``labels`` (and maybe ``prompt_length``)."""
    return example


def _plain(section) -> object:
    """A config section as plain data (what a transform factory may have read from it)."""
    return section.model_dump(mode="json") if hasattr(section, "model_dump") else vars(section)


def _transform_for(spec, cfg: TrainConfig, search_dir):

    type_name = getattr(spec, "type", None)
    if type_name is None:
        return _pretokenized, {"remove_columns": "__all__"}
    factory = resolve_transform(type_name, search_dir)
    try:
        made = factory(cfg, dataset=spec)
    except Exception as exc:
        raise DataError(f"dataset '{spec.path}': transform '{type_name}' failed: {type(exc).__name__}: {exc}") from exc
    fn, options = made if isinstance(made, tuple) and len(made) == 2 else (made, {})
    if not callable(fn) or not isinstance(options, dict):
        raise DataError(
            f"dataset '{spec.path}': transform '{type_name}' must return (function, options dict), "
            f"got {type(made).__name__}"
        )
    unknown = set(options) - {"remove_columns", "batched", "pack_length", "pack_separator", "end_length"}
    if unknown:
        raise DataError(f"dataset '{spec.path}': transform '{type_name}' returned unknown options {sorted(unknown)}")
    return fn, options


def _with_block_errors(rows, cfg: TrainConfig) -> list[str | None]:
    """The rows' transform errors, plus "no block fits" for rows that are well-formed but too short."""
    import pyarrow.compute as pc

    lengths: list[int] = []
    for batch in rows.select_columns(["input_ids"]).with_format("arrow").iter(4096):
        lengths.extend(pc.list_value_length(batch["input_ids"]).to_pylist())
    ebft = cfg.ebft
    fits = block_errors(
        lengths,
        rows["prompt_length"],
        sequence_len=cfg.sequence_len,
        context_length=ebft.context_length,
        stride=ebft.stride,
        generate_max_len=ebft.generate_max_len,
        min_completion_prefix=ebft.min_completion_prefix,
    )
    return [error if error is not None else fit for error, fit in zip(rows[ERROR], fits, strict=False)]


class _Skips:
    """Running count of dropped rows and a description of the first one."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def drop(self, rows, errors, path: str, unit: str):
        errors = list(errors)
        keep = [i for i, error in enumerate(errors) if error is None]
        if len(keep) == len(errors):
            return rows
        self.count += len(errors) - len(keep)
        if self.first is None:
            i = next(i for i, error in enumerate(errors) if error is not None)
            source = rows[i][ROW]
            where = f"{unit} {source}" if source >= 0 else f"output row {i} of the batched transform"
            self.first = f"dataset '{path}', {where}: {errors[i]}"
        return rows.select(keep)


def split_validation(data: Dataset, val_set_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Hold out ``val_set_size`` rows: a fraction when < 1, a count when >= 1, none when 0."""
    if not val_set_size:
        return data, None
    if val_set_size < 0:
        raise DataError(f"val_set_size must be >= 0, got {val_set_size}")
    size = float(val_set_size) if val_set_size < 1 else int(val_set_size)
    if isinstance(size, int) and size >= len(data):
        raise DataError(f"val_set_size={val_set_size} leaves no training rows out of {len(data)}")
    try:
        parts = data.train_test_split(test_size=size, seed=seed)
    except ValueError as exc:
        raise DataError(f"val_set_size={val_set_size} cannot split {len(data)} rows: {exc}") from exc
    return parts["train"], parts["test"]
