"""A ``.gguf`` file as a base model (docs/design.md §7.1): dequantized once into a plain Hugging Face folder.

A GGUF file holds a model's (usually quantized) weights, its config and its tokenizer. transformers reads
it with the ``gguf`` package, but a quantized load can be neither trained nor saved, so ebft dequantizes
it to fp32 and writes an ordinary folder (``config.json``, weights, tokenizer, chat template) under a
cache; every loader (policy, LoRA, feature network, checkpoints, evaluation, ``vllm-serve``) then reads
that folder. The folder is keyed by the file's name, size and modification time, so a changed file is
converted again and an unchanged one never is. It is written to a hidden temporary folder and renamed
into place, so an interrupted conversion never leaves a half-written model where a loader would find
it; a lock file lets one of several processes (a multi-process launch) convert while the others wait.

Where the cache lives: ``$EBFT_CACHE/gguf``, else ``$XDG_CACHE_HOME/ebft/gguf``, else
``~/.cache/ebft/gguf``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from ebft.errors import ConfigError

log = logging.getLogger("ebft")

GGUF_MIN_VERSION = (0, 10)
# Written last into a converted folder: where it came from. A folder without it is not a finished conversion.
SOURCE_FILE = "ebft_gguf_source.json"
INSTALL_HINT = "pip install 'ebft[gguf]'"

# Cached folders already named in the log by this process (each loader resolves the file again).
_announced: set[Path] = set()


def is_gguf(source: str | os.PathLike) -> bool:
    """Whether a ``base_model`` / ``tokenizer_config`` value names a GGUF file (by its extension)."""
    return str(source).lower().endswith(".gguf")


def cache_root() -> Path:
    """The folder holding converted GGUF models (see the module docstring)."""
    if os.environ.get("EBFT_CACHE"):
        return Path(os.environ["EBFT_CACHE"]).expanduser() / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ebft" / "gguf"


def local_model(source: str, key: str = "base_model") -> str:
    """``source`` unchanged, or for a ``.gguf`` file the cached folder converted from it (converting
    it first if needed). ``key`` names the config field in error messages."""
    return str(gguf_to_folder(source, key=key)) if is_gguf(source) else source


def gguf_to_folder(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, key: str = "base_model"
) -> Path:
    """The Hugging Face folder (fp32 weights, config, tokenizer) converted from the GGUF file ``path``.

    Converts on first use and returns the cached folder afterwards. ``cache_dir`` overrides
    :func:`cache_root`. Raises ConfigError, naming the file, when it does not exist, cannot be read as
    GGUF (corrupt or truncated), holds an architecture or tokenizer transformers cannot convert, or
    lacks weights the model needs; and when the ``gguf`` package is missing.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder, not a GGUF file" if file.is_dir() else "no such file"
        raise ConfigError(f"{key}: {str(path)!r}: {what}")
    file = file.resolve()
    target = _cached_folder(file, cache_dir)
    root = target.parent
    if not _finished(target):
        _require_gguf_package(key, file)
        architecture, vocab = _read_header(key, file)
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{target.name}.lock"):
            if not _finished(target):  # another process may have converted it while this one waited
                _convert(key, file, architecture, vocab, target)
                _announced.add(target)
                return target
    if target not in _announced:
        log.info("%s: using %s, converted from %s", key, target, file)
        _announced.add(target)
    return target


def _cached_folder(file: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of the GGUF file ``file``, keyed by its name, size and modification time."""
    stat = file.stat()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / f"{file.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def needs_conversion(path: str | os.PathLike) -> bool:
    """Whether the existing GGUF file ``path`` has no finished conversion in the cache yet (so loading it needs
    the gguf package)."""
    return not _finished(_cached_folder(Path(path).expanduser().resolve()))


def _finished(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def _require_gguf_package(key: str, file: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        import gguf  # noqa: F401  (only checking that it imports)

        found = version("gguf")
    except (ImportError, PackageNotFoundError) as exc:
        raise ConfigError(f"{key}: reading the GGUF file {file} needs the gguf package: {INSTALL_HINT}") from exc
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if parts < GGUF_MIN_VERSION:
        raise ConfigError(
            f"{key}: reading the GGUF file {file} needs gguf >= "
            f"{'.'.join(map(str, GGUF_MIN_VERSION))} (found {found}): {INSTALL_HINT}"
        )


def _read_header(key: str, file: Path) -> tuple[str, int | None]:
    """The file's architecture and the number of tokens its vocabulary lists, after reading its whole
    header and tensor table: a file that is not GGUF, or is cut short, fails here with a clear error
    instead of deep inside transformers."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    # The reader reports a bad magic, a short file or an inconsistent tensor table as whichever of these
    # numpy or struct raise first.
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{key}: {file} is not a readable GGUF file (corrupt, truncated or not GGUF): {type(exc).__name__}: {exc}"
        ) from exc
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return architecture, None if tokens is None else len(tokens.data)


@contextmanager
def _locked(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` while the block runs (POSIX; elsewhere the atomic rename
    alone keeps the cache consistent). Closing the file releases the lock, also when the process dies."""
    with open(lock_path, "w") as handle:
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert(key: str, file: Path, architecture: str, vocab: int | None, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

    # Under the lock, a leftover partial folder belongs to a conversion that died; it is never used.
    for stale in target.parent.glob(f".{target.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    log.info("%s: converting %s (GGUF, %s) to a Hugging Face folder, once: %s", key, file, architecture, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            # With output_loading_info the result is (model, info); the annotation names the model alone.
            model, info = cast(
                tuple[PreTrainedModel, dict[str, Any]],
                AutoModelForCausalLM.from_pretrained(
                    file.parent,
                    gguf_file=file.name,
                    quantization_config=GgufConfig(dequantize=True),
                    dtype=torch.float32,
                    output_loading_info=True,
                ),
            )
        # ValueError: an architecture or tokenizer type transformers does not convert; KeyError: metadata
        # it needs is missing; NotImplementedError: the gguf package does not know the architecture.
        except (ValueError, KeyError, NotImplementedError, OSError, RuntimeError) as exc:
            raise ConfigError(
                f"{key}: cannot convert the GGUF file {file} (architecture {architecture!r}) with transformers "
                f"{transformers.__version__}: {type(exc).__name__}: {exc}"
            ) from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(
                f"{key}: the GGUF file {file} has no weights for {shown}; the model would train from random "
                "values there, so it is not converted"
            )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if vocab is not None:
            tokenizer = _drop_unlisted_tokens(key, file, tmp, vocab)
        stat = file.stat()
        source = {"gguf_file": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%s: converted; tokenizer eos %r, pad %r, chat template %s, tied embeddings %s",
        key,
        tokenizer.eos_token,
        tokenizer.pad_token,
        "yes" if tokenizer.chat_template else "none",
        bool(getattr(model.config, "tie_word_embeddings", False)),
    )


def _drop_unlisted_tokens(key: str, file: Path, folder: Path, vocab: int):
    """Remove tokens the file's vocabulary does not list from the saved tokenizer; return it reloaded.

    transformers' byte-level GGUF tokenizer adds ``<|endoftext|>`` when the vocabulary lacks it (Llama 3,
    for one). That token has no embedding row, so training would grow the embeddings with a new row the
    model never had and could then sample it.
    """
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    extra = {t["content"] for t in spec.get("added_tokens", []) if t["id"] >= vocab}
    if extra:
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab]
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        settings_path = folder / "tokenizer_config.json"
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
        for name in [k for k, v in settings.items() if k.endswith("_token") and v in extra]:
            del settings[name]
        settings_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("%s: %s lists %d tokens; dropped %s, which transformers added", key, file.name, vocab, sorted(extra))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"{key}: the tokenizer converted from {file} has {len(tokenizer)} tokens but the file lists {vocab}; "
            "the extra ones have no embeddings"
        )
    return tokenizer


def require_local_folder(key: str, source: str) -> None:
    """A path that can only be local and is not a folder: say so, instead of the hub's repo-id complaint."""
    local = Path(source).expanduser()
    if local.is_dir() or not (source.startswith(("/", ".", "~")) or local.exists()):
        return
    if local.exists():
        raise ConfigError(f"{key}: {source!r} is a file, not a model folder")
    raise ConfigError(f"{key}: no such folder {source!r}")
