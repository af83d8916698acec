"""What is evaluated: the models (base, full checkpoint or LoRA adapter, and the base model's feature
source) and the held-out rows."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from ebft.config import TrainConfig
from ebft.config.evaluation import held_out_config
from ebft.data.cache import load_datasets
from ebft.errors import ConfigError, EbftError
from ebft.modeling.adapters import peft_wrapping
from ebft.modeling.policy import check_model_config, load_policy
from ebft.modeling.tokenizer import load_tokenizer

log = logging.getLogger("ebft")

# `ebft evaluate` without held-out rows (val_set_size 0, no --split) evaluates at most this many training
# documents, spread evenly: a stable mean in minutes rather than the whole training set.
TRAIN_SAMPLE_DOCS = 200


def _checkpoint_kind(checkpoint: Path) -> str:
    if (checkpoint / "adapter_config.json").is_file():
        return "lora"
    if (checkpoint / "config.json").is_file():
        return "full"
    if not checkpoint.exists():
        raise EbftError(f"--checkpoint {checkpoint}: no such folder")
    raise EbftError(
        f"--checkpoint {checkpoint}: neither a model folder (config.json) nor a LoRA adapter folder "
        "(adapter_config.json)"
    )


def _plain(cfg: TrainConfig, base_model: str):
    """The config, loading ``base_model`` as plain weights: no fresh adapter, no checkpointing."""
    return cfg.model_copy(update={"base_model": base_model, "adapter": None, "gradient_checkpointing": False})


def load_models(cfg: TrainConfig, checkpoint: str | Path | None, device: torch.device):
    """(tokenizer, policy, feature source, kind) for the base model or a checkpoint.

    kind: "base", "full" (a whole model folder) or "lora" (an adapter over ``cfg.base_model``).
    The feature source is always the base model's weights: the policy itself where they are shared
    (base, or LoRA under ``disable_adapter``), else a separately loaded base model.
    """

    check_model_config(cfg)
    if checkpoint is None:
        tokenizer = load_tokenizer(cfg)
        policy = load_policy(_plain(cfg, cfg.base_model), tokenizer, device)
        return tokenizer, policy, policy, "base"
    path = Path(checkpoint)
    kind = _checkpoint_kind(path)
    # Training saves the tokenizer with every checkpoint; prefer it (it has any added special tokens).
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(cfg.model_copy(update={"tokenizer_config": str(path)}) if has_tokenizer else cfg)
    base = load_policy(_plain(cfg, cfg.base_model), tokenizer, device)
    if kind == "full":
        policy = load_policy(_plain(cfg, str(path)), tokenizer, device)
        return tokenizer, policy, base, kind
    from peft import PeftModel

    try:
        with peft_wrapping():
            policy = PeftModel.from_pretrained(base, str(path)).to(device)
    # UnpicklingError: an adapter_model.bin that holds more than tensors, refused unrun (weights_only loading).
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if isinstance(exc, pickle.UnpicklingError):
            first = "a pickled weights file holds more than tensors; it was refused without being run"
        raise ConfigError(
            f"--checkpoint {path}: cannot load the LoRA adapter onto {cfg.base_model!r}: {type(exc).__name__}: {first}"
        ) from exc
    return tokenizer, policy, policy, kind


def held_out_plan(cfg: TrainConfig, split: str | None, max_docs: int | None) -> tuple[str, int | None]:
    """(what ``evaluate`` reads, in words, for its first line; the most documents it evaluates).

    ``split`` given: every dataset entry at that split. Else the ``test_datasets`` rows, or the validation rows
    when ``val_set_size`` > 0.
    Else a sample of the training rows, at most ``TRAIN_SAMPLE_DOCS`` of them unless ``max_docs`` says
    otherwise: the model may have trained on them, and the whole set can take hours.
    """
    limit = f"at most {max_docs} documents, spread evenly" if max_docs is not None else "every document"
    if split is not None:
        return f"the datasets at split '{split}' ({limit})", max_docs
    if cfg.test_datasets:
        return f"the test_datasets rows ({limit})", max_docs
    if cfg.val_set_size > 0:
        return f"the validation rows (val_set_size={cfg.val_set_size:g}, seed {cfg.seed}; {limit})", max_docs
    cap = TRAIN_SAMPLE_DOCS if max_docs is None else max_docs
    return (
        f"a sample of the training rows (at most {cap} documents, spread evenly; the model may have trained on "
        "them): val_set_size is 0, no test_datasets and no --split; set one of them for held-out rows, "
        "--max-docs for another sample size",
        cap,
    )


def held_out_rows(cfg: TrainConfig, tokenizer, split: str | None, config_dir: Path | None = None):
    """(rows, description) of the documents (strided) or prompt rows (structured) to evaluate on.

    ``split`` given: every dataset entry read at that split, in full. Otherwise the ``test_datasets`` rows, or
    the validation part of the training data when ``val_set_size`` > 0 (the same rows training held out: same data, same
    seed), else the training rows (``held_out_plan`` bounds how many are read).
    ``config_dir``: where custom transform modules are looked up (as in training).
    """
    if split is not None:
        specs = [spec.model_copy(update={"split": split}) for spec in cfg.datasets]
        at_split = cfg.model_copy(update={"datasets": specs, "val_set_size": 0.0})
        return load_datasets(
            at_split, tokenizer, search_dir=config_dir
        ).train, f"rows of the datasets at split '{split}'"
    if cfg.test_datasets:
        return load_datasets(held_out_config(cfg), tokenizer, search_dir=config_dir).train, "test_datasets rows"
    if cfg.val_set_size > 0:
        data = load_datasets(cfg, tokenizer, search_dir=config_dir)
        return data.val, f"validation rows (val_set_size={cfg.val_set_size:g}, seed {cfg.seed})"
    splits = ", ".join(sorted({spec.split for spec in cfg.datasets}))
    return load_datasets(cfg, tokenizer, search_dir=config_dir).train, f"training rows (split {splits})"
