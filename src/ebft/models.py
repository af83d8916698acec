"""Policy, tokenizer, LoRA and the frozen feature network (DESIGN 3; paper reference spec 5.1)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ebft.errors import ConfigError
from ebft.gguf_cache import local_model
from ebft.strided.architecture import check_strided_architecture

log = logging.getLogger("ebft")


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``bf16: auto`` means bf16 only where the device runs it natively (CUDA with bf16 support)."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(setting)


def _require_local_folder(key: str, source: str) -> None:
    """A path that can only be local and is not a folder: say so, instead of the hub's repo-id complaint."""
    local = Path(source).expanduser()
    if local.is_dir() or not (source.startswith(("/", ".", "~")) or local.exists()):
        return
    if local.exists():
        raise ConfigError(f"{key}: {source!r} is a file, not a model folder")
    raise ConfigError(f"{key}: no such folder {source!r}")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = local_model(cfg.tokenizer_config or cfg.base_model, key)
    _require_local_folder(key, source)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        local = Path(source).expanduser()
        if local.is_dir() and not any(local.glob("tokenizer*")):
            raise ConfigError(
                f"{key}: the folder {source!r} holds no tokenizer (no tokenizer.json or tokenizer_config.json); "
                "save the tokenizer there or set tokenizer_config to a folder or hub id that has one"
            ) from exc
        raise ConfigError(f"{key}: cannot load a tokenizer from {source!r}: {exc}") from exc
    if cfg.special_tokens:
        tok.add_special_tokens(dict(cfg.special_tokens))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"the tokenizer of {source!r} has neither a pad token nor an eos token; "
                "set special_tokens: {pad_token: ...}"
            )
        # Padding is never attended to by real tokens, never anchored and never labelled, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; padding with the eos token %r", tok.eos_token)
    check_token_ids(cfg, len(tok))
    return tok


def check_token_ids(cfg, vocab_size: int) -> None:
    """Every token id the config names must exist in the tokenizer: an id outside it could never be
    sampled (a stop id that never stops), so it is an error naming the key, the id and the size."""
    if cfg.ebft.mode != "structured":
        return  # the trl block is not used in strided mode (the config warns about it)
    key = "trl.generation_kwargs.stop_token_ids"
    for token_id in cfg.trl.generation_kwargs.stop_token_ids or ():
        if token_id >= vocab_size:
            raise ConfigError(
                f"{key}: {token_id} is not a token id of this tokenizer (a vocabulary of {vocab_size} tokens, "
                f"ids 0..{vocab_size - 1}); use the ids of this model's own stop tokens, e.g. "
                "tokenizer.convert_tokens_to_ids('<|im_end|>'), or drop the key"
            )


def check_model_config(cfg) -> None:
    """Checks that need only the model's config.json, run before any data or weights load."""
    from transformers import AutoConfig

    source = local_model(cfg.base_model)
    _require_local_folder("base_model", source)
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
    from ebft.adapters import check_adapter_source

    check_adapter_source(cfg)


def policy_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the policy's weights are stored in.

    Full fine-tuning keeps fp32 master weights (autocast supplies bf16 compute); LoRA freezes the base,
    so it can be stored in bf16 while the adapters stay fp32.
    """
    return torch.bfloat16 if (use_bf16(cfg.bf16, device) and cfg.adapter is not None) else torch.float32


def load_policy(cfg, tokenizer, device: torch.device) -> nn.Module:
    """The trainable model: full weights, or a PEFT LoRA wrapper over frozen base weights."""
    from transformers import AutoModelForCausalLM

    from ebft.adapters import keep_4bit_layers_differentiable, quantisation_kwargs

    source = local_model(cfg.base_model)
    _require_local_folder("base_model", source)
    quantised = quantisation_kwargs(cfg, device)
    try:
        # No attn_implementation: transformers then takes SDPA, or eager where the architecture has no
        # SDPA path (Gemma-2's soft-capping). Strided passes swap in their own backend (strided.attention).
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=policy_dtype(cfg, device), trust_remote_code=cfg.trust_remote_code, **quantised
        )
    # RuntimeError: weights whose shapes do not match config.json; SafetensorError: a truncated or
    # corrupt weights file (an interrupted download).
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"base_model: cannot load {source!r}: {type(exc).__name__}: {exc}") from exc
    if quantised:
        keep_4bit_layers_differentiable(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return prepare_policy(model, cfg, device)


def prepare_policy(model: nn.Module, cfg, device: torch.device) -> nn.Module:
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
    if cfg.adapter is not None:
        from ebft.adapters import add_adapter

        model = add_adapter(cfg, model)
        if cfg.gradient_checkpointing and kwargs.get("use_reentrant"):
            model.enable_input_require_grads()
    return model.to(device)


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm) of a causal LM or its PEFT wrapper."""
    body = model.get_decoder()
    if body is None or body is model:
        raise ConfigError(f"{type(model).__name__} exposes no decoder body (get_decoder()); it cannot be used")
    return body


class ScaledHead(nn.Module):
    """The LM head followed by what the causal LM does to its logits after it: a constant factor (Cohere
    ``logit_scale``, Granite 1 / ``logits_scaling``), then soft-capping (Gemma-2/3 ``final_logit_softcapping``:
    cap * tanh(logits / cap))."""

    def __init__(self, head: nn.Module, scale: float, cap: float | None):
        super().__init__()
        self.head, self.scale, self.cap = head, scale, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def output_head(model: nn.Module) -> nn.Module:
    """hidden [..., H] -> logits [..., V] exactly as the causal LM computes them from its last hidden state."""
    head = model.get_output_embeddings()
    text = model.config.get_text_config()
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:
        scale *= text.logit_scale
    if getattr(text, "logits_scaling", None) is not None:
        scale /= text.logits_scaling
    cap = getattr(text, "final_logit_softcapping", None)
    return head if scale == 1.0 and cap is None else ScaledHead(head, scale, cap)


def _truncated(body: nn.Module, depth: int) -> nn.Module:
    """A view of ``body`` that stops after layer ``depth`` and shares every weight with it.

    Only the module containers are new, so LoRA layers inside stay the policy's own (and
    ``disable_adapter`` still applies). Stopping at the deepest feature layer skips the rest of the
    network and the LM head (reference spec 11.2, item 4). The final norm is kept only when the view
    is the whole body, so layer N's features are post-norm exactly as in ``output_hidden_states``.
    """
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or depth >= len(layers):
        return body
    view = copy.copy(body)
    view._modules = dict(body._modules)
    view.layers = nn.ModuleList(list(layers)[:depth])
    if hasattr(view, "norm"):
        view.norm = nn.Identity()
    return view


class FeatureNetwork:
    """The frozen feature network phi: hidden states at the chosen layer indices, no gradient.

    With LoRA it is the policy's own base weights under ``disable_adapter()`` (no second copy); for full
    fine-tuning, or with ``frozen_copy`` (a warm start's own model as the critic, its LoRA layers included),
    it is a frozen copy of the body made at start, cut after the deepest feature layer.
    """

    def __init__(
        self,
        policy: nn.Module,
        layers: Sequence[int],
        *,
        device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        frozen_copy: bool = False,
    ):
        self.layers = list(layers)
        self.depth = max(self.layers)
        self.shared = hasattr(policy, "disable_adapter") and not frozen_copy
        self._policy = policy
        view = _truncated(backbone_of(policy), self.depth)
        if self.shared:
            self.body = view
        else:
            self.body = copy.deepcopy(view)
            self.body.requires_grad_(False)
            self.body.eval()
            if device is not None:
                self.body.to(device)
        self.device = device or next(self.body.parameters()).device
        self.autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, plan=None) -> list[torch.Tensor]:
        """input_ids [D, S] -> one [D, S, H] fp32 tensor per requested layer (same order as ``layers``).

        With a ``StridedPlan`` the rows are packed strided rows; with a ``PackedPlan`` one row of whole
        sequences (``ebft.packed``); without one, ordinary causal sequences.
        """
        from ebft.packed import Packed, PackedPlan, packed_forward
        from ebft.strided.attention import strided_backend, strided_forward

        captured: dict[int, torch.Tensor] = {}
        layer_list = getattr(self.body, "layers", None)
        with ExitStack() as stack:
            stack.enter_context(self._policy.disable_adapter() if self.shared else nullcontext())
            stack.enter_context(_eval_mode(self.body))
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            for idx in set(self.layers):
                if idx != self.depth:
                    stack.enter_context(_capture(layer_list, idx, captured))
            ids, pos = input_ids.to(self.device), position_ids.to(self.device)
            if plan is None:
                last = self.body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            elif isinstance(plan, PackedPlan):
                last = packed_forward(self.body, Packed(ids, pos, plan))
            else:
                stack.enter_context(strided_backend(self.body))
                last = strided_forward(self.body, ids, pos, plan)
        captured[self.depth] = last
        # detach: with gradient checkpointing on, transformers marks the embedding output requires_grad even
        # under no_grad, and layer 0's state would then drag an autograd graph through the rewards.
        return [captured[i].detach().float() for i in self.layers]


@contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode inside the block; afterwards every submodule gets back its own flag.

    Restoring one flag for the whole tree would be wrong: ``module`` may be a view whose own flag went
    stale when the policy it shares layers with was switched to training later, and writing that
    flag back would leave the policy's layers in eval mode (no dropout, no gradient checkpointing).
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def _capture(layers: nn.ModuleList, idx: int, store: dict[int, torch.Tensor]):
    """Record hidden state ``idx``: the input of layer 0 for idx 0, else the output of layer idx - 1."""

    def first(_module, args, kwargs):
        store[idx] = args[0] if args else kwargs["hidden_states"]

    def after(_module, _args, output):
        store[idx] = output[0] if isinstance(output, tuple) else output

    if idx == 0:
        handle = layers[0].register_forward_pre_hook(first, with_kwargs=True)
    else:
        handle = layers[idx - 1].register_forward_hook(after)
    try:
        yield
    finally:
        handle.remove()


def feature_network_for(cfg, source: nn.Module, device: torch.device, *, frozen_copy: bool = False) -> FeatureNetwork:
    """The config's feature network over ``source`` (the policy, or a separately loaded base model);
    ``frozen_copy``: a frozen copy of ``source`` with its adapter (``ebft.feature_network: warm_start``)."""
    from ebft.features import layer_indices

    feature_device = torch.device(cfg.ebft.feature_device) if cfg.ebft.feature_device else device
    return FeatureNetwork(
        source,
        layer_indices(cfg.ebft.feature_layers, source.config.num_hidden_layers),
        device=feature_device,
        autocast_dtype=autocast_dtype(cfg, device),
        frozen_copy=frozen_copy,
    )


def autocast_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the config asks for it (see ``use_bf16``), else none (fp32)."""
    return torch.bfloat16 if use_bf16(cfg.bf16, device) else None


def cache_keyword(body: nn.Module) -> str:
    """The name under which ``body.forward`` takes the KV cache: ``cache`` since transformers 5.24
    (``past_key_values`` is deprecated there, removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
