"""A model's shape for the memory plan, from its config alone: the model is built on the meta device
(parameter shapes, no storage), and a config's LoRA adapter is counted by letting PEFT inject it there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ebft.config import TrainConfig
from ebft.modeling.adapters import peft_wrapping
from ebft.modeling.memory_plan import ModelShape
from ebft.modeling.parts import backbone_of, causal_lm, decoder_layers
from ebft.modeling.source import SOURCE_FILE, cache_root, is_gguf

# layer_types entries whose layers keep a key/value cache.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def plan_model_config(cfg: TrainConfig):
    """(the base model's transformers config, None), read without loading or converting any weights and
    without the network; or (None, the reason) when it is not on this machine.

    A hub id is read from the local Hugging Face cache only (``ebft train`` fetches config.json first; an
    offline lookup would otherwise retry for half a minute). A ``.gguf`` file is read from its converted
    folder when there is one, else from the file's metadata (which needs the ``gguf`` package)."""
    from transformers import AutoConfig

    source = cfg.base_model
    kwargs: dict[str, bool | str] = {"trust_remote_code": cfg.trust_remote_code, "local_files_only": True}
    if is_gguf(source):
        file = Path(source).expanduser()
        converted = _converted_folder(file)
        if converted is not None:
            source = str(converted)
        else:
            source, kwargs["gguf_file"] = str(file.parent), file.name
    try:
        return AutoConfig.from_pretrained(source, **kwargs), None
    except (OSError, ValueError, ImportError, KeyError) as exc:
        if not (is_gguf(cfg.base_model) or Path(cfg.base_model).expanduser().exists()):
            return None, (
                f"the config of {cfg.base_model!r} is not in this machine's Hugging Face cache; fetch it "
                f"(hf download {cfg.base_model} config.json) to see the plan"
            )
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return None, f"cannot read the config of {cfg.base_model!r} ({first})"


def _converted_folder(file: Path) -> Path | None:
    """The cache folder a GGUF file was converted into (``ebft.modeling.source``), if it exists."""
    if not file.is_file():
        return None
    stat = file.resolve().stat()
    folder = cache_root() / f"{file.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    return folder if (folder / SOURCE_FILE).is_file() else None


def model_shape(config, *, lora=None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of ``AutoModelForCausalLM.from_config(config)``, built on the meta device. ``lora``: a PEFT
    ``LoraConfig`` whose trainable parameters are counted (injected into the meta model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    shape = _shape_of(model, config.get_text_config())
    if lora is None:
        return shape
    from peft import get_peft_model

    with peft_wrapping():
        adapted = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return replace(shape, adapter_params=trainable)


def _shape_of(model: nn.Module, text) -> ModelShape:
    body = backbone_of(model)
    layers = decoder_layers(body)
    lm = causal_lm(model)
    embedding = cast(nn.Embedding, lm.get_input_embeddings())  # an nn.Embedding in transformers
    head = lm.get_output_embeddings()
    tied = head is None or head.weight is embedding.weight
    norm = getattr(body, "norm", None)
    parts = [embedding, layers] + [m for m in (norm, head) if isinstance(m, nn.Module)]
    counted = {id(p) for part in parts for p in part.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layer_types = getattr(text, "layer_types", None)
    attention = len(layers) if not layer_types else sum(t in _ATTENTION_LAYER_TYPES for t in layer_types)
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    return ModelShape(
        vocab=embedding.weight.shape[0],
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        attention_layers=attention,
        embedding_params=embedding.weight.numel(),
        head_params=0 if tied or head is None else sum(p.numel() for p in head.parameters()),
        final_norm_params=sum(p.numel() for p in norm.parameters()) if isinstance(norm, nn.Module) else 0,
        other_params=other,
        linear_params=linear,
    )
