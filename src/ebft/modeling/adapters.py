"""LoRA on the policy: a fresh adapter or a warm start from a trained one, over full or quantised base weights.

* A fresh adapter is built from the config's ``lora_*`` keys.
* ``lora_model_dir`` continues training a saved PEFT LoRA adapter (an SFT run, say). Its
  ``adapter_config.json`` fixes the rank, alpha and target modules; the config must agree with it
  (``lora_r``, ``lora_alpha``, and the modules ``lora_target_*`` select, when set), and its weights
  must fit the base exactly: a missing folder, another adapter type, unknown or missing adapter
  tensors and wrong shapes are errors, never a partial load.
* ``load_in_4bit`` / ``load_in_8bit`` load the frozen base through bitsandbytes; the adapters stay in
  full precision, and the feature network reads the same quantised base under ``disable_adapter``.
* Targets PEFT refuses on the architecture (a Mamba mixer's ``out_proj``, say): ``lora_target_linear`` leaves
  them out and logs it; ``lora_target_modules`` naming them is an error that lists them. PEFT itself is
  asked, on a stand-in of one linear layer per module name, before the real model is touched.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ebft.config import TrainConfig
from ebft.errors import ConfigError
from ebft.modeling.parts import causal_lm

if TYPE_CHECKING:
    from peft import PeftModel
from ebft.modeling.precision import use_bf16

log = logging.getLogger("ebft")

# What bitsandbytes runs on (its 0.50 wheels): CUDA and ROCm GPUs, Intel XPU, and CPUs (x86-64, aarch64).
QUANTISATION_NEEDS = (
    "bitsandbytes (pip install 'ebft[qlora]'), which runs on CUDA and ROCm GPUs, Intel XPUs and x86-64 / aarch64 CPUs"
)


def quantisation_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """``from_pretrained`` arguments that load the base quantised as the config asks; {} for full precision."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    try:
        import bitsandbytes  # noqa: F401 (transformers loads it itself; this only turns its absence into advice)
    except ImportError as exc:
        raise ConfigError(f"{key}: needs {QUANTISATION_NEEDS}; it is not installed") from exc
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        compute = torch.bfloat16 if use_bf16(cfg.bf16, device) else torch.float32
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    # Quantise straight onto the training device instead of building full-precision weights first.
    return {"quantization_config": quant, "device_map": {"": device}}


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (it acts only on CPUs with AVX512-BF16).

    bitsandbytes (0.50) repacks a Linear4bit's weight for a faster CPU kernel on its first forward in eval
    mode without grad, and from then on always runs that kernel, which has no backward: every gradient
    that must pass through a 4-bit layer (to LoRA weights below it) silently becomes zero. Rollouts and
    the feature network run exactly such forwards, so the repacking is switched off on every layer.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def peft_wrapping():
    """Around every PEFT call that wraps a transformers model (``get_peft_model``, ``PeftModel.from_pretrained``).

    PEFT (0.21 and earlier) reads transformers' deprecated ``is_gradient_checkpointing`` alias in
    ``PeftModel.__init__`` to decide whether to make the input embeddings require grad, and transformers 5
    warns on every read; ebft itself only uses the ``activation_checkpointing`` API. This one message, raised
    by that one read, is dropped here; any other warning passes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_adapter(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """``model`` wrapped in a trainable PEFT LoRA adapter: fresh, or the one in ``cfg.lora_model_dir``."""
    from peft import get_peft_model

    if cfg.lora_model_dir is None:
        lora = _config_lora(cfg, model)
        try:
            with peft_wrapping():
                return get_peft_model(model, lora)
        except ValueError as exc:  # PEFT: the targets match nothing
            raise ConfigError(f"lora_target_modules: {exc}") from exc
    return _warm_start(cfg, model)


def _config_lora(cfg: TrainConfig, model: nn.Module):
    from peft import LoraConfig

    if cfg.lora_target_linear:
        targets: str | list[str] | None = "all-linear"
        excluded = _refused_linear_names(model)
    else:
        targets, excluded = cfg.lora_target_modules, None
        _check_targets_accepted(model, targets)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        exclude_modules=excluded,
        task_type="CAUSAL_LM",
    )


def _refused_linear_names(model: nn.Module) -> list[str] | None:
    """The names of linear layers that PEFT refuses to adapt on this architecture (None when it takes them
    all), each logged once: ``lora_target_linear`` leaves them out instead of failing."""
    paths = _paths_by_name(model, lambda _path, module: isinstance(module, _linear_classes()))
    refused = sorted(name for name, path in paths.items() if _peft_refuses(model, path))
    if not refused:
        return None
    log.info(
        "lora_target_linear: no LoRA on %s: PEFT does not adapt those layers of a %r model",
        ", ".join(refused),
        getattr(model.config, "model_type", type(model).__name__),
    )
    return refused


def _check_targets_accepted(model: nn.Module, targets) -> None:
    """ConfigError naming every module ``lora_target_modules`` selects that PEFT refuses on this architecture."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=targets)
    paths = _paths_by_name(model, lambda path, _module: bool(check_target_module_exists(probe, path)))
    refused = sorted(name for name, path in paths.items() if _peft_refuses(model, path))
    if refused:
        raise ConfigError(
            f"lora_target_modules: PEFT cannot put LoRA on {refused} in a "
            f"{getattr(model.config, 'model_type', type(model).__name__)!r} model; remove them "
            "(lora_target_linear: true adapts every linear layer PEFT accepts and leaves these out)"
        )


def _linear_classes() -> tuple[type, ...]:
    """What PEFT's ``all-linear`` adapts: torch linear layers (bitsandbytes' included) and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _paths_by_name(model: nn.Module, keep) -> dict[str, str]:
    """One full module path per module name (its last component) among the modules ``keep(path, module)``
    selects, the output head left out (neither ``all-linear`` nor a LoRA head is meant)."""
    head = causal_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if path and module is not head and keep(path, module):
            out.setdefault(path.rsplit(".", 1)[-1], path)
    return out


def _peft_refuses(model: nn.Module, path: str) -> bool:
    """Whether PEFT refuses LoRA on the module at ``path`` of ``model``'s architecture. Asked on a stand-in
    (one 1 x 1 linear layer at the same path, under the model's config), so that a refusal never leaves the
    real model half-adapted: PEFT checks each module only as it replaces it."""
    from peft import LoraConfig, inject_adapter_in_model

    stand_in = node = nn.Module()
    *parents, name = path.split(".")
    for part in parents:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(name, nn.Linear(1, 1))
    stand_in.config = model.config
    try:
        inject_adapter_in_model(LoraConfig(r=1, target_modules=[path]), stand_in)
    except ValueError:
        return True
    return False


def check_adapter_source(cfg: TrainConfig) -> None:
    """Before any weights load: ``lora_model_dir`` holds a LoRA adapter that the config agrees with."""
    if cfg.adapter is None or cfg.lora_model_dir is None:
        return
    saved = saved_adapter_config(cfg)
    trained_on = saved.base_model_name_or_path
    if trained_on and _normalised(trained_on) != _normalised(cfg.base_model):
        log.warning(
            "lora_model_dir: the adapter was trained on %r, this run's base_model is %r; they must be the same "
            "weights (shapes are checked when it loads, the weights themselves cannot be)",
            trained_on,
            cfg.base_model,
        )


def _adapter_dir(cfg: TrainConfig) -> str:
    """``lora_model_dir``, which every warm-start path requires."""
    if cfg.lora_model_dir is None:
        raise ConfigError("lora_model_dir: not set; a warm start needs the folder or hub id of a trained LoRA adapter")
    return cfg.lora_model_dir


def saved_adapter_config(cfg: TrainConfig):
    """The LoraConfig saved in ``cfg.lora_model_dir``, checked against the config (reads one small file)."""
    saved = read_adapter_config(_adapter_dir(cfg), "lora_model_dir")
    for key, ours, theirs in (("lora_r", cfg.lora_r, saved.r), ("lora_alpha", cfg.lora_alpha, saved.lora_alpha)):
        if ours != theirs:
            raise ConfigError(
                f"{key}: {ours} differs from the adapter in lora_model_dir ({theirs}, in "
                f"{cfg.lora_model_dir}/adapter_config.json); set {key}: {theirs}"
            )
    return saved


def read_adapter_config(source: str, key: str):
    """The LoraConfig of the adapter at ``source`` (a folder or hub id); ``key`` names it in errors."""
    from peft import PeftConfig

    local = Path(source).expanduser()
    if not local.exists() and source.startswith(("/", ".", "~")):
        raise ConfigError(f"{key}: no such folder {source!r}")
    if local.is_file():
        raise ConfigError(f"{key}: {source!r} is a file, not an adapter folder")
    if local.is_dir() and not (local / "adapter_config.json").is_file():
        hint = " (it holds a full model, which needs no adapter)" if (local / "config.json").is_file() else ""
        raise ConfigError(f"{key}: {source!r} holds no adapter_config.json, so it is no PEFT adapter{hint}")
    try:
        saved = PeftConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read the adapter config of {source!r}: {exc}") from exc
    kind = str(getattr(saved.peft_type, "value", saved.peft_type))
    if kind != "LORA":
        raise ConfigError(f"{key}: {source!r} holds a {kind} adapter; ebft trains LoRA adapters only")
    if getattr(saved, "use_dora", False):
        raise ConfigError(f"{key}: {source!r} is a DoRA adapter; ebft trains plain LoRA adapters only")
    return saved


def _normalised(source: str) -> str:
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


def _warm_start(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    saved = saved_adapter_config(cfg)
    wanted = (
        _selected_modules(model, _config_lora(cfg, model))
        if (cfg.lora_target_linear or cfg.lora_target_modules)
        else None
    )
    saved.lora_dropout = cfg.lora_dropout
    model = load_adapter(model, _adapter_dir(cfg), saved, "lora_model_dir", trainable=True)
    adapted = _lora_module_names(model)
    if wanted is not None and wanted != adapted:
        only_ours, only_theirs = sorted(wanted - adapted)[:4], sorted(adapted - wanted)[:4]
        raise ConfigError(
            "lora_target_modules / lora_target_linear select other modules than the adapter in lora_model_dir "
            f"(only in the config: {only_ours}; only in the adapter: {only_theirs}); remove them to use the "
            "adapter's own targets"
        )
    log.info("warm start: training continues from the LoRA adapter in %s", cfg.lora_model_dir)
    return model


def load_adapter(model: nn.Module, source: str, lora, key: str, *, trainable: bool) -> PeftModel:
    """``model`` wrapped with the adapter ``lora`` and every one of its saved weights from ``source``, or an error."""
    from peft import get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    lora.inference_mode = not trainable
    try:
        with peft_wrapping():
            adapted = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: target modules not found in the base model
        raise ConfigError(f"{key}: the adapter in {source!r} does not fit the base model: {exc}") from exc
    device = next(adapted.parameters()).device
    try:
        weights = load_peft_weights(source, device=str(device))
        # load_state_dict's (missing_keys, unexpected_keys); PEFT annotates it as the bare ``namedtuple``.
        missing_keys, unexpected_keys = cast(tuple[list[str], list[str]], set_peft_model_state_dict(adapted, weights))
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: shapes that do not match the base
        raise ConfigError(f"{key}: cannot load the adapter weights of {source!r} onto the base model: {exc}") from exc
    missing = [k for k in missing_keys if "lora_" in k]
    if unexpected_keys or missing:
        raise ConfigError(
            f"{key}: the adapter weights in {source!r} do not match its adapter_config.json on this base model "
            f"(unexpected: {unexpected_keys[:4]}, missing: {missing[:4]})"
        )
    return adapted


def _lora_module_names(model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _selected_modules(model: nn.Module, lora) -> set[str]:
    """The modules ``lora`` would adapt on ``model``: inject it, read the names, take it out again."""
    from peft import get_peft_model

    try:
        with peft_wrapping():
            probe = get_peft_model(model, lora)
    except ValueError as exc:  # PEFT: the config's targets match nothing
        raise ConfigError(f"lora_target_modules: {exc}") from exc
    names = _lora_module_names(probe)
    probe.unload()
    return names


def warm_start_critic(cfg: TrainConfig) -> bool:
    """Whether the feature network is the warm-started model itself (``ebft.feature_network: warm_start``)."""
    return cfg.adapter is not None and cfg.lora_model_dir is not None and cfg.ebft.feature_network == "warm_start"
