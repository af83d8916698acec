"""Everything a config needs from this machine, checked before any data or weights load (docs/design.md §2).

``ebft validate`` reports all of it, and ``ebft train`` (also ``evaluate``, ``preprocess``, ``vllm-serve``)
refuses to start without it, each problem one ``key: what is wrong; the fix`` line:

* optional packages: wandb for ``wandb_project``, tensorboard for ``use_tensorboard``, bitsandbytes for
  ``load_in_4bit`` / ``load_in_8bit``, gguf for a ``.gguf`` base not converted yet, vllm for
  ``ebft vllm-serve``;
* the model: a local ``base_model`` folder with a config.json (not a LoRA adapter folder), or a ``.gguf``
  file; a hub id that is not in the Hugging Face cache while ``HF_HUB_OFFLINE`` is set;
* the tokenizer: a local folder (``tokenizer_config``, else the ``base_model`` folder) that holds one;
* ``lora_model_dir``, ``chat_template_jinja`` (a file, and a template that compiles), data files (local paths
  that exist, with readable file types) and the dataset transforms (importable ``module.function``; a custom
  module is imported, so its top-level code runs here), or, for an entry without one, a first row that already
  has the mode's fields (local JSON files);
* ``trl.use_vllm``: whether the vLLM server answers is ``ebft.vllm.backend``'s to say (``probe_server``,
  ``wait_for_server``): ``validate`` probes it once, ``train`` waits for it before anything loads.

The checks only read the config and the file system; what they use from the machine (which packages are
installed, whether CUDA is there) is passed in, so tests can say what is installed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ebft.config import TrainConfig
from ebft.data.load import local_files, looks_local
from ebft.data.transforms import resolve_transform
from ebft.errors import ConfigError, DataError
from ebft.modeling.adapters import QUANTISATION_NEEDS
from ebft.modeling.attention_choice import choose_attention
from ebft.modeling.chat_templates import JINJA, template_text
from ebft.modeling.optional import package_available
from ebft.modeling.policy import check_model_config
from ebft.modeling.source import INSTALL_HINT as GGUF_HINT
from ebft.modeling.source import is_gguf, needs_conversion

log = logging.getLogger("ebft")

COMMANDS = ("validate", "train", "evaluate", "preprocess", "vllm-serve")
# Files whose presence makes a folder a tokenizer (one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class Findings:
    """problems: ``key: reason and fix`` lines that stop the command; notes: lines it only warns with."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def preflight(
    cfg,
    command: str = "train",
    *,
    config_dir: str | Path | None = None,
    installed: Callable[[str], bool] = package_available,
    cuda: bool | None = None,
) -> Findings:
    """What ``command`` needs and this machine lacks (see the module docstring). ``config_dir``: where custom
    transform modules are found besides sys.path; ``installed(package)``; ``cuda``: training would run on CUDA
    (default: whether torch sees a CUDA device)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    found = Findings()
    found.problems += _packages(cfg, command, installed)
    found.problems += _model_and_tokenizer(cfg)
    found.problems += _chat_template(cfg)
    if command != "vllm-serve":
        found.problems += _datasets(cfg, config_dir)
    if command == "validate":
        # Training logs this itself when it loads the model (once, whichever command loads it).
        note = choose_attention(cfg.attn_implementation, cuda=cuda, installed=installed).note
        found.notes += [note] if note else []
    return found


def check(
    cfg: TrainConfig, command: str = "train", *, config_dir: str | Path | None = None, source: str | None = None
) -> None:
    """Raise one ConfigError listing every problem ``preflight`` finds for ``command``; log its notes."""
    found = preflight(cfg, command, config_dir=config_dir)
    for note in found.notes:
        log.warning(note)
    if found.problems:
        raise problems_error(found.problems, f"cannot {command} on this machine", source)


def problems_error(problems: list[str], headline: str, source: str | None = None) -> ConfigError:
    """One error: ``[source: ]headline, N problem(s):`` then one indented line per problem."""
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    lines = "\n".join(f"  {p}" for p in problems)
    return ConfigError(f"{source + ': ' if source else ''}{headline}, {count}:\n{lines}")


def _packages(cfg: TrainConfig, command: str, installed: Callable[[str], bool]) -> list[str]:
    needs: list[tuple[str, str]] = []  # (package, the problem line when it is missing)
    if command in ("validate", "train"):
        if cfg.wandb_project is not None:
            needs.append(
                (
                    "wandb",
                    "wandb_project: needs the wandb package, which is not installed; pip install 'ebft[wandb]' "
                    "(or set wandb_project: null)",
                )
            )
        if cfg.use_tensorboard:
            needs.append(
                (
                    "tensorboard",
                    "use_tensorboard: needs the tensorboard package, which is not installed; "
                    "pip install 'ebft[tensorboard]'",
                )
            )
    if command != "vllm-serve":
        needs += [
            ("bitsandbytes", f"{key}: needs {QUANTISATION_NEEDS}; it is not installed")
            for key in ("load_in_4bit", "load_in_8bit")
            if getattr(cfg, key)
        ]
    for key in ("base_model", "tokenizer_config"):
        value = getattr(cfg, key)
        file = Path(value).expanduser() if value else None
        if file is not None and is_gguf(value) and file.is_file() and needs_conversion(file):
            needs.append(("gguf", f"{key}: reading the GGUF file {file.resolve()} needs the gguf package: {GGUF_HINT}"))
    if command == "vllm-serve":
        needs.append(
            (
                "vllm",
                "trl.use_vllm: needs the vllm package, which is not installed; pip install 'ebft[vllm]' (it needs a "
                "CUDA GPU and its own torch build; without trl.use_vllm, rollouts use transformers generate)",
            )
        )
    return [line for package, line in needs if not installed(package)]


def _model_and_tokenizer(cfg: TrainConfig) -> list[str]:
    model = [p for p in (_model_source("base_model", cfg.base_model), _offline_hub(cfg.base_model)) if p]
    lora = cfg.lora_model_dir
    if cfg.adapter is not None and lora is not None and _is_path(lora) and not Path(lora).expanduser().is_dir():
        model.append(f"lora_model_dir: no such folder {lora!r} (relative paths are read from {os.getcwd()})")
    if not model and Path(cfg.base_model).expanduser().is_dir():
        # What the model's config.json says about this config (architecture, lengths, a warm-start adapter).
        try:
            check_model_config(cfg)
        except ConfigError as exc:
            model.append(str(exc))
    tokenizer = [p for p in (_model_source("tokenizer_config", cfg.tokenizer_config, weights=False),) if p]
    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    folder = Path(cfg.tokenizer_config or cfg.base_model).expanduser()
    if not tokenizer and folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer.append(
            f"{key}: the folder {str(folder)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer there or set tokenizer_config to a folder or hub id that has one"
        )
    return model + tokenizer


def _is_path(value: str) -> bool:
    """Whether a model or adapter value can only be a local path (a hub id is 'name' or 'namespace/name')."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).expanduser().exists()


def _model_source(key: str, value: str | None, *, weights: bool = True) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    where = f" (relative paths are read from {os.getcwd()})" if not path.is_absolute() else ""
    if is_gguf(value):
        return None if path.is_file() else f"{key}: no such GGUF file {value!r}{where}"
    if not _is_path(value):
        return None
    if not path.exists():
        return f"{key}: no such folder {value!r}{where}; give a local model folder, a .gguf file or a hub id"
    if not path.is_dir():
        return f"{key}: {value!r} is a file, not a model folder (a .gguf file needs the .gguf extension)"
    if weights and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return (
            f"{key}: {value!r} holds a LoRA adapter, not a model; set base_model to the model it was trained on "
            f"and lora_model_dir: {value} (with adapter: lora) to continue training it"
        )
    if weights and not (path / "config.json").is_file():
        return f"{key}: the folder {value!r} holds no config.json, so it is not a Hugging Face model folder"
    return None


def _offline_hub(value: str) -> str | None:
    """A hub id that cannot be fetched: offline mode, and not in the cache."""
    if _is_path(value) or is_gguf(value) or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return None
    return (
        f"base_model: {value!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it first "
        "(unset HF_HUB_OFFLINE) or give a local folder"
    )


def _chat_template(cfg: TrainConfig) -> list[str]:
    if cfg.chat_template_jinja is None or cfg.chat_template not in (None, JINJA):
        return []
    try:
        text = template_text(cfg.chat_template_jinja)
    except (OSError, UnicodeDecodeError) as exc:
        return [f"chat_template_jinja: {exc}"]
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        return [f"chat_template_jinja: not a valid Jinja template (line {exc.lineno}: {exc.message})"]
    return []


def _datasets(cfg: TrainConfig, config_dir: str | Path | None) -> list[str]:
    problems: list[str] = []
    entries = [(f"datasets.{i}", spec) for i, spec in enumerate(cfg.datasets)]
    entries += [(f"test_datasets.{i}", spec) for i, spec in enumerate(cfg.test_datasets or [])]
    for where, spec in entries:
        local = Path(spec.path).expanduser()
        if local.exists():
            try:
                local_files(local, spec.data_files, spec.path)
            except DataError as exc:
                problems.append(f"{where}.path: {exc}")
        elif looks_local(spec.path):
            cwd = f" (relative paths are read from {os.getcwd()})" if not local.is_absolute() else ""
            problems.append(f"{where}.path: no such file or folder {spec.path!r}{cwd}")
        if spec.type is not None:
            try:
                resolve_transform(spec.type, config_dir)
            except DataError as exc:
                problems.append(f"{where}.type: {exc}")
        elif local.exists() and (missing := _untransformed_row_lacks(cfg.ebft.mode, local, spec)):
            problems.append(f"{where}.type: {missing}")
    return problems


# The fields an entry without a transform must already have, per mode.
NEEDED_FIELDS = {"strided": ("input_ids", "labels"), "structured": ("prompt", "ground_truth")}


def _untransformed_row_lacks(mode: str, local: Path, spec) -> str | None:
    """An entry without ``type`` is used as it is, so its rows must hold the mode's fields: checked on the
    first row of a local JSON file (other sources are checked when the data is read)."""
    try:
        files = [Path(f) for f in local_files(local, spec.data_files, spec.path)[1]]
    except DataError:
        return None  # reported as datasets.N.path above
    first = next((f for f in files if f.suffix.lower() in (".json", ".jsonl")), None)
    row = _first_json_row(first) if first is not None else None
    need = NEEDED_FIELDS.get(mode, ())
    if not isinstance(row, dict) or all(field in row for field in need):
        return None
    example = "ebft_pretrain.transform for raw text" if mode == "strided" else "ebft_opencode.transform"
    return (
        f"none, so the rows are used as they are, but they have no {' / '.join(need)} ({mode} mode; the first "
        f"row has {sorted(row)[:6]}); set type to a transform, e.g. {example}"
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
