"""What ``ebft train`` would reject, found from local files alone, before anything loads: ``ebft validate``
runs this after the config's own checks.

It reads config.json of a local base model (or one in the Hugging Face cache; a Hub model that is not
there is checked when ``train`` downloads it), looks for the tokenizer's files, checks that every local
dataset exists and that each entry's transform can be found, and, for an entry without ``type``, that the
first row of a local JSON file already has the fields the mode needs. No weights load and no code from
the config runs: a custom transform module is only looked up, not imported (with
``trust_remote_code: true`` transformers does run the model folder's configuration code to read its
config, as ``train`` would).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from ebft.data.load import local_dataset_files
from ebft.data.transforms import BUILTIN_MODULES, resolve_transform
from ebft.errors import ConfigError, DataError
from ebft.modeling.policy import check_model_config
from ebft.modeling.source import is_gguf, require_local_folder

# The fields an entry without a transform must already have, per mode.
NEEDED_FIELDS = {"strided": ("input_ids", "labels"), "structured": ("prompt", "ground_truth")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def preflight(cfg, config_dir: Path | None = None) -> None:
    """Raise ConfigError or DataError for the first problem (see the module docstring)."""
    model_dir = _model_folder(cfg)
    if model_dir is not None:
        check_model_config(cfg.model_copy(update={"base_model": str(model_dir)}))
    _tokenizer(cfg, model_dir)
    for spec in cfg.datasets:
        files = local_dataset_files(spec)
        if spec.type:
            _transform(spec.type, config_dir)
        else:
            _rows_without_transform(cfg.ebft.mode, spec, files)


def _model_folder(cfg) -> Path | None:
    """The base model's local folder (a Hub id's cached snapshot), or None where it cannot be read offline."""
    source = cfg.base_model
    if is_gguf(source):  # converted (dequantized) when train first loads it: only its existence is cheap
        if not Path(source).expanduser().is_file():
            raise ConfigError(f"base_model: {source!r}: no such file")
        return None
    require_local_folder("base_model", source)
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    try:
        cached = try_to_load_from_cache(source, "config.json")  # the local cache only, no network
    except ValueError:  # not a valid Hub id either: train's own loading says so
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _tokenizer(cfg, model_dir: Path | None) -> None:
    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = cfg.tokenizer_config
    if source is None:
        folder = model_dir
    elif is_gguf(source):
        if not Path(source).expanduser().is_file():
            raise ConfigError(f"tokenizer_config: {source!r}: no such file")
        return
    else:
        require_local_folder(key, source)
        folder = Path(source).expanduser() if Path(source).expanduser().is_dir() else None
    if folder is not None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: the folder {str(folder)!r} holds no tokenizer (no tokenizer.json or tokenizer_config.json); "
            "save the tokenizer there or set tokenizer_config to a folder or hub id that has one"
        )


def _transform(type_name: str, config_dir: Path | None) -> None:
    """A built-in transform resolves; a custom one's module must exist (looked up, never imported)."""
    module_name = type_name.rpartition(".")[0]
    if not module_name or module_name in BUILTIN_MODULES:
        resolve_transform(type_name)  # the built-ins are this package's own modules; bad forms raise here
        return
    top = module_name.split(".")[0]
    search = [str(Path(config_dir).resolve())] if config_dir is not None else []
    found = importlib.machinery.PathFinder.find_spec(top, search) if search else None
    if found is None and top not in sys.modules and importlib.util.find_spec(top) is None:
        where = f" or in {search[0]}" if search else ""
        raise DataError(
            f"dataset type '{type_name}': no module '{top}' (neither a built-in transform "
            f"({', '.join(BUILTIN_MODULES)}) nor importable from sys.path{where})"
        )


def _rows_without_transform(mode: str, spec, files: list[Path]) -> None:
    """An entry without ``type``: its rows go in as they are, so they must hold the mode's fields. Checked on
    the first row of a local JSON file (other sources are checked when train reads them)."""
    first = next((f for f in files if f.suffix.lower() in (".json", ".jsonl")), None)
    if first is None:
        return
    row = _first_json_row(first)
    need = NEEDED_FIELDS[mode]
    if isinstance(row, dict) and not all(field in row for field in need):
        raise DataError(
            f"dataset '{spec.path}': no type, so its rows are used as they are, but they have no "
            f"{' / '.join(need)} ({mode} mode; the first row has {sorted(row)[:6]}); set type to a transform, "
            f"e.g. {'ebft_pretrain.transform for raw text' if mode == 'strided' else 'ebft_opencode.transform'}"
        )


def _first_json_row(path: Path):
    """The first row of a JSON Lines file, or of a JSON array up to 16 MiB; None otherwise."""
    if path.suffix.lower() == ".json" and path.stat().st_size > 16 * 2**20:
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        if path.suffix.lower() == ".jsonl":
            line = next((line for line in handle if line.strip()), "")
            try:
                return json.loads(line)
            except ValueError:
                return None
        try:
            data = json.load(handle)
        except ValueError:
            return None
    return data[0] if isinstance(data, list) and data else None
