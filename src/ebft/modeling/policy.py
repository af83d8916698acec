"""The policy: a causal LM loaded from the config (full weights or LoRA, optionally quantised), and the checks
that need only its config.json."""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from torch import nn

from ebft.attention.support import check_strided_architecture
from ebft.config import TrainConfig
from ebft.errors import ConfigError
from ebft.modeling.adapters import (
    add_adapter,
    check_adapter_source,
    keep_4bit_layers_differentiable,
    quantisation_kwargs,
)
from ebft.modeling.attention_choice import choose_attention, model_class_support
from ebft.modeling.optional import package_available
from ebft.modeling.parts import embedding_rows
from ebft.modeling.precision import policy_dtype
from ebft.modeling.source import local_model, require_local_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("ebft")

# Attention warnings already given by this process (evaluation loads the base model more than once).
_said: set[str] = set()


def check_model_config(cfg: TrainConfig) -> None:
    """Checks that need only the model's config.json, run before any data or weights load."""
    from transformers import AutoConfig

    source = local_model(cfg.base_model)
    require_local_folder("base_model", source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model: cannot load the config of {source!r}: {type(exc).__name__}: {exc}") from exc
    if cfg.ebft.mode == "strided":
        check_strided_architecture(config)
    max_pos = getattr(config, "max_position_embeddings", None)
    # Packed strided rows reuse the document's positions (a rollout token takes c_k + t < sequence_len).
    if max_pos is not None and cfg.sequence_len > max_pos:
        raise ConfigError(f"sequence_len: {cfg.sequence_len} exceeds the model's max_position_embeddings ({max_pos})")

    check_adapter_source(cfg)


def load_policy(cfg: TrainConfig, tokenizer, device: torch.device) -> nn.Module:
    """The trainable model: full weights, or a PEFT LoRA wrapper over frozen base weights."""
    from transformers import AutoModelForCausalLM

    source = local_model(cfg.base_model)
    require_local_folder("base_model", source)
    quantised = quantisation_kwargs(cfg, device)
    attention = _attention(cfg, source, device)
    backend = {} if attention is None else {"attn_implementation": attention}
    log.info("loading the model %s", source)
    try:
        # Without attn_implementation transformers takes SDPA, or eager where the architecture has no SDPA
        # path (Gemma-2's soft-capping). Strided and packed passes swap in their own backend for their duration.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=policy_dtype(cfg, device), trust_remote_code=cfg.trust_remote_code, **quantised, **backend
        )
    # RuntimeError: weights whose shapes do not match config.json; SafetensorError: a truncated or
    # corrupt weights file (an interrupted download); UnpicklingError: a pickled weights file (.bin) that holds
    # more than tensors, refused unrun by torch.load(weights_only=True).
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if isinstance(exc, pickle.UnpicklingError):
            first = "a pickled weights file holds more than tensors; it was refused without being run"
        raise ConfigError(f"base_model: cannot load {source!r}: {type(exc).__name__}: {first}") from exc
    if quantised:
        keep_4bit_layers_differentiable(model)
    if len(tokenizer) > embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    return prepare_policy(model, cfg, device)


def _attention(cfg: TrainConfig, source: str, device: torch.device) -> str | None:
    """The backend for ``cfg.attn_implementation`` (``ebft.modeling.attention_choice``); its warning, when it
    is not the one asked for, is logged once per process."""
    from transformers import AutoConfig

    if cfg.attn_implementation is None:
        return None
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    choice = choose_attention(
        cfg.attn_implementation,
        cuda=device.type == "cuda",
        installed=package_available,
        supports=model_class_support(config),
    )
    if choice.note is not None and choice.note not in _said:
        _said.add(choice.note)
        log.warning(choice.note)
    return choice.implementation


def prepare_policy(model: PreTrainedModel, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """A loaded causal LM made into the config's policy: gradient checkpointing, LoRA (fresh, or
    ``lora_model_dir``'s) when ``adapter`` is set, on ``device``. (``load_policy`` ends here; benchmarks that
    build a model from a config in memory start here.) The config's ``use_cache`` is left as the model has
    it, so a saved model is what users load for inference; every forward in ebft passes ``use_cache`` itself."""
    if cfg.gradient_checkpointing:
        kwargs = dict(cfg.gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    policy: nn.Module = model
    if cfg.adapter is not None:
        policy = add_adapter(cfg, model)
        if cfg.gradient_checkpointing and kwargs.get("use_reentrant"):
            # On the model the adapter wraps: the PEFT wrapper forwards this call to it.
            model.enable_input_require_grads()
    return policy.to(device)


def load_warm_start(cfg: TrainConfig, tokenizer, device: torch.device) -> nn.Module:
    """Base + the ``lora_model_dir`` adapter as saved, for a frozen warm-start feature network."""

    return load_policy(cfg.model_copy(update={"gradient_checkpointing": False}), tokenizer, device)
