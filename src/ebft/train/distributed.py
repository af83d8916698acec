"""FSDP2 for the training loop: sharding the policy, running its passes, full state dicts.

The trainer shards with ``torch.distributed.fsdp.fully_shard`` itself rather than through accelerate's
FSDP plugin: the plugin does not run on CPU (it silently falls back to DDP), and it prepares the model
for ``model.forward``, which the trainer never calls (it runs the decoder body and the LM head
separately). accelerate still launches the processes and gives rank, world size and device.

Layout: every decoder layer is its own FSDP group; ``ShardedPolicy``, a wrapper around the whole
model, is the root group and holds everything else (embeddings, final norm, LM head, tied or not).

Collectives: a group all-gathers its parameters in its forward hook and reduce-scatters its gradients
after its backward, so every process must call every group the same number of times or the job hangs.
Many passes are data-dependent (decoding runs until a per-process length, the LM head runs in chunks
whose count depends on the process's tokens), so:

* passes without gradient (rollouts, feature scoring, old log-probs) run inside ``gathered()``: every
  group is unsharded once and stays so, and nothing inside issues a collective;
* a pass with gradient runs as ``grad_pass(fn, ...)``: one call of the root, inside which ``fn`` may use
  the body and the head any number of times; the body runs each layer once. So the collectives match
  when every process makes the same passes, which the callers ensure (a process with nothing to
  contribute still runs its pass, with zero weight).

Gradients: each process's loss is already divided by step-global counts, so gradients are summed over
processes (divide factor 1, and a sum reduction because gloo has no pre-multiplied sum). Gradients are
reduce-scattered after every backward: skipping the sync between micro-batches would keep full,
unsharded gradients on every process until the last one, the memory FSDP is there to save.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ebft.errors import ConfigError
from ebft.modeling.parts import backbone_of

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


class ShardedPolicy(nn.Module):
    """The FSDP root: ``forward(fn, *args, **kwargs)`` runs ``fn(model, *args, **kwargs)`` between the
    root's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


@dataclass
class Sharding:
    """How the policy's passes run: directly (``root`` None, no FSDP) or through the FSDP root."""

    model: nn.Module
    root: ShardedPolicy | None = None
    reshard_after_forward: dict[FSDPModule, bool] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return self.root is not None

    def grad_pass(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)``; under FSDP as one call of the root (see the module docstring)."""
        if self.root is None:
            return fn(self.model, *args, **kwargs)
        return self.root(fn, *args, **kwargs)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Every group unsharded for the whole block, so the passes inside issue no collective.

        Costs the full parameters on every process while it lasts (no gradients, no optimizer state).
        """
        if self.root is None:
            yield
            return
        groups = list(self.reshard_after_forward)
        for module in groups:
            module.set_reshard_after_forward(False, recurse=False)
        for module in groups:
            module.unshard()
        try:
            yield
        finally:
            for module in groups:
                module.reshard()
                module.set_reshard_after_forward(self.reshard_after_forward[module], recurse=False)


def shard(
    model: nn.Module, device: torch.device, *, reshard_after_forward: bool = True, layer_class: str | None = None
) -> Sharding:
    """Shard ``model`` in place over all processes (call after the frozen feature copy is made: FSDP
    modules cannot be deep-copied). Returns the ``Sharding`` the runners pass their passes through.

    ``layer_class``: the decoder layer class name the config expects (axolotl's
    ``transformer_layer_cls_to_wrap``); None accepts whatever the model's layers are."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = getattr(backbone_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"fsdp: {type(model).__name__} has no decoder layer list (get_decoder().layers) to shard")
    found = type(layers[0]).__name__
    if layer_class is not None and layer_class != found:
        raise ConfigError(
            f"fsdp_config.transformer_layer_cls_to_wrap: {layer_class!r}, but the model's decoder layers are {found}"
        )
    # fully_shard returns the module it was given, its class extended with FSDPModule's methods.
    groups: dict[FSDPModule, bool] = {}
    for layer in layers:
        groups[fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)] = reshard_after_forward
    root = ShardedPolicy(model)
    # The root's parameters are needed again as soon as backward starts (FSDP's own default for a root).
    sharded_root = fully_shard(root, mesh=mesh, reshard_after_forward=False)
    groups[sharded_root] = False
    for module in groups:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    # FSDP takes as root the first group to run forward; passes under gathered() call the body or a
    # layer directly, so the root runs once here, before any of them. Resharding after it puts the
    # sharded parameters back on the modules, which is what the optimizer must be given.
    root(lambda _model: None)
    sharded_root.reshard()
    return Sharding(model, root, groups)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` as a float; with sharded gradients the norm is a DTensor over all processes."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on the main process (others get an empty dict). A collective:
    every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A model's state dict holds tensors only; the declared value type also covers optimizer states.
    return cast(dict[str, torch.Tensor], state)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded on the main process. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: dict) -> None:
    """Load what ``full_state_dict`` / ``full_optimizer_state_dict`` saved, read on the main process
    only (the other processes pass empty dicts) and broadcast from there. A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # strict=False: a tied LM head is saved once, and an adapter checkpoint holds no base weights;
    # the caller checks the keys before anything is loaded.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    local = get_optimizer_state_dict(model, optimizer)  # also creates lazily made state (AdamW moments)
    # "state" maps each parameter name to its state dict (torch's format; the declared type is any value).
    per_param = cast(dict[str, dict[str, Any]], local["state"])
    if any(torch.is_tensor(v) and v.dim() > 0 for state in per_param.values() for v in state.values()):
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        return
    # No per-parameter tensors (plain SGD): set_optimizer_state_dict cannot broadcast then (it takes the
    # device from them), and only the hyperparameters (the learning rate) are left to restore.
    groups: list[Any] = [optim_state.get("param_groups")]
    dist.broadcast_object_list(groups, src=0)
    for group, saved in zip(optimizer.param_groups, groups[0], strict=True):
        group.update({key: value for key, value in saved.items() if key != "params"})


_ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B)\.(weight|bias)$")


def adapter_key_to_module_key(key: str) -> str:
    """An ``adapter_model.safetensors`` key -> the PEFT model's parameter name (adapter ``default``)."""
    return _ADAPTER_KEY.sub(r".\1.default.\2", key)


def first_error(accelerator, message: str | None) -> str | None:
    """Every process's ``message`` (None where all went well) gathered: the first one, on every process, so
    that all of them stop together instead of the others waiting in a collective for one that failed."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object

    return next((m for m in gather_object([message]) if m), None)
