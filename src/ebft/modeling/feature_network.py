"""The frozen feature network phi: hidden states of chosen layers, without gradient, from a truncated
view of the body; and where it runs (docs/guide.md, "Where the feature network runs").

Placement follows axolotl: ``ebft.feature_device`` when set; else, with one process and two or more
visible CUDA GPUs, the GPU after the policy's; else the policy's own device. On another device than the
policy the network is a frozen copy (with LoRA too: the base layers without the adapters), its inputs
are moved there and its features moved back.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ebft.attention.packed import Packed, PackedPlan, packed_forward
from ebft.attention.strided import StridedPlan, build_plan, strided_backend, strided_forward
from ebft.attention.strided_layout import StridedLayout
from ebft.config import TrainConfig
from ebft.errors import ConfigError
from ebft.features import layer_indices
from ebft.modeling.parts import backbone_of, causal_lm
from ebft.modeling.precision import autocast, autocast_dtype, feature_dtype

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger("ebft")


def _truncated(body: nn.Module, depth: int) -> nn.Module:
    """A view of ``body`` that runs its first ``depth`` layers (at least one) and shares every weight with it.

    Only the module containers are new, so LoRA layers inside stay the policy's own (and
    ``disable_adapter`` still applies). Stopping at the deepest feature layer skips the rest of the
    network and the LM head (docs/design.md §5.1). Nothing else is changed: the view still ends
    with the body's final norm, whatever the body calls it (``norm``, ``norm_f``, ``final_layernorm``, ...),
    so its output is not a feature; ``FeatureNetwork`` reads hidden state ``depth`` from the output of
    layer ``depth - 1`` (or the input of layer 0) instead, where ``output_hidden_states`` takes it.
    """
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or depth >= len(layers):
        return body
    view = copy.copy(body)
    view._modules = dict(body._modules)
    # One layer at least: hidden state 0 is read on its way into layer 0.
    view.layers = nn.ModuleList(list(layers)[: max(depth, 1)])
    return view


class FeatureNetwork:
    """The frozen feature network phi: hidden states at the chosen layer indices, no gradient.

    With LoRA on the policy's own device it is the policy's base weights under ``disable_adapter()`` (no
    second copy). Otherwise it is a frozen copy of the body made at start, cut after the deepest feature
    layer: for full fine-tuning; with ``frozen_copy`` (a warm start's own model as the critic, its LoRA
    layers included); and with LoRA on another ``device`` (the base layers, adapters removed). ``dtype``:
    the copy's parameter dtype (default: as the source). Features are returned on the policy's device.
    """

    def __init__(
        self,
        policy: nn.Module,
        layers: Sequence[int],
        *,
        device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        frozen_copy: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.layers = list(layers)
        self.depth = max(self.layers)
        self.home = next(policy.parameters()).device
        self.device = _same_device(device or self.home, self.home)
        self.shared = hasattr(policy, "disable_adapter") and not frozen_copy and self.device == self.home
        self._policy = policy
        body = backbone_of(policy)
        # The body's own output (after its final norm) is hidden state num_layers; every other one is read
        # from a layer, never from a truncated body's output.
        body_layers = getattr(body, "layers", None)
        self.num_layers = len(body_layers) if isinstance(body_layers, nn.ModuleList) else self.depth
        view = _truncated(body, self.depth)
        if self.shared:
            self.body = view
        else:
            self.body = copy.deepcopy(view)
            if hasattr(policy, "disable_adapter") and not frozen_copy:
                _remove_adapters(self.body)
            self.body.requires_grad_(False)
            self.body.eval()
            if dtype is not None:
                _cast_parameters(self.body, dtype)
            self.body.to(self.device)
        self.autocast_dtype = autocast_dtype
        self._transfer_stated = False

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the weights this network holds of its own (0 when it shares the policy's)."""
        if self.shared:
            return 0
        return sum(p.numel() * p.element_size() for p in self.body.parameters())

    def placement(self) -> str:
        """One line: where the network runs, what it is and in which dtype."""
        if self.shared:
            return f"feature network: the policy's base weights under disable_adapter on {self.device} (no copy)"
        dtype = next(self.body.parameters()).dtype
        return (
            f"feature network: frozen copy of the first {self.depth} layers on {self.device}, "
            f"{str(dtype).removeprefix('torch.')}, {self.parameter_bytes / 2**30:.2f} GiB"
            + ("" if self.device == self.home else f" (policy on {self.home})")
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, plan=None) -> list[torch.Tensor]:
        """input_ids [D, S] -> one [D, S, H] fp32 tensor per requested layer (same order as ``layers``), on
        the policy's device.

        With a ``StridedPlan`` the rows are packed strided rows; with a ``PackedPlan`` one row of whole
        sequences (``ebft.attention.packed``); without one, ordinary causal sequences.
        """

        captured: dict[int, torch.Tensor] = {}
        layer_list = getattr(self.body, "layers", None)
        with ExitStack() as stack:
            # Shared: the policy is a PEFT model (it has disable_adapter), see __init__.
            stack.enter_context(cast("PeftModel", self._policy).disable_adapter() if self.shared else nullcontext())
            stack.enter_context(eval_mode(self.body))
            stack.enter_context(autocast(self.device, self.autocast_dtype))
            for idx in set(self.layers):
                if idx != self.num_layers:
                    if not isinstance(layer_list, nn.ModuleList):
                        raise ConfigError(
                            f"{type(self.body).__name__} has no decoder layer list (layers) to read hidden state {idx}"
                        )
                    stack.enter_context(_capture(layer_list, idx, captured))
            ids, pos = input_ids.to(self.device), position_ids.to(self.device)
            if plan is None:
                last = self.body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            elif isinstance(plan, PackedPlan):
                last = packed_forward(self.body, Packed(ids, pos, plan))
            else:
                stack.enter_context(strided_backend(self.body))
                last = strided_forward(self.body, ids, pos, plan_on(plan, self.device))
        if self.depth == self.num_layers:
            captured[self.depth] = last  # post-norm, as output_hidden_states has it
        # detach: with gradient checkpointing on, transformers marks the embedding output requires_grad even
        # under no_grad, and layer 0's state would then drag an autograd graph through the rewards.
        out = [captured[i].detach().float() for i in self.layers]
        if self.device == self.home:
            return out
        if self._transfer_stated:
            return [h.to(self.home) for h in out]
        return self._first_transfer(ids, pos, out)

    def _first_transfer(self, ids, pos, out: list[torch.Tensor]) -> list[torch.Tensor]:
        """The features moved to the policy's device, and what running on another device costs, in the log
        once: the bytes each way and the seconds of the move back (timed after the forward has finished)."""
        self._transfer_stated = True
        _synchronize(self.device)
        started = time.perf_counter()
        moved = [h.to(self.home) for h in out]
        _synchronize(self.home)
        seconds = time.perf_counter() - started
        sent = (ids.numel() * ids.element_size() + pos.numel() * pos.element_size()) / 2**20
        returned = sum(h.numel() * h.element_size() for h in moved) / 2**20
        log.info(
            "feature network on %s, policy on %s: each call moves its token ids there and the fp32 features back "
            "(first call: %.2f MiB in, %.1f MiB out in %.3f s)",
            self.device,
            self.home,
            sent,
            returned,
            seconds,
        )
        return moved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_on(plan: StridedPlan, device: torch.device) -> StridedPlan:
    """``plan`` for rows on ``device``: itself when built there, else rebuilt from its layout (flex_attention
    BlockMasks on CUDA, chunked SDPA masks elsewhere)."""
    layout = plan.flex_layout if plan.uses_flex else plan.layout
    if layout is None:
        raise RuntimeError("a StridedPlan built without its layout cannot be moved to another device")
    want_flex = device.type == "cuda"
    if plan.uses_flex == want_flex and layout.anchors.device == device:
        return plan
    moved = StridedLayout(layout.doc_len, layout.anchors.to(device), layout.valid.to(device), layout.n, layout.g)
    return build_plan(moved, use_flex=want_flex, compile_flex=plan.compile_flex)


def _same_device(device: torch.device, home: torch.device) -> torch.device:
    """``device`` with an index where it names "the current GPU" (``cuda``): the policy's when that is a GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return home if home.type == "cuda" else torch.device("cuda", 0)
    return device


def _remove_adapters(module: nn.Module) -> None:
    """Replace every PEFT adapter layer in ``module`` by the base layer it wraps (in place, on a copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in module.named_children():
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _remove_adapters(child)


def _cast_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype``; buffers keep theirs (rotary frequencies stay fp32, as
    transformers keeps them when it loads a model in bf16), quantised weights stay quantised."""
    for param in module.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


@contextmanager
def eval_mode(module: nn.Module):
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


def visible_cuda_devices() -> int:
    """How many CUDA GPUs this process can see (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def feature_placement(setting: str | None, policy_device: torch.device, *, processes: int, gpus: int) -> torch.device:
    """Where the feature network runs: ``ebft.feature_device`` when set; else, with one process and two or more
    visible GPUs, the GPU after the policy's (as axolotl places it); else the policy's device. Under several
    processes each one keeps it on its own device: the next GPU would be another process's."""
    if setting is not None:
        return _same_device(torch.device(setting), policy_device)
    if processes == 1 and policy_device.type == "cuda" and gpus >= 2:
        return torch.device("cuda", ((policy_device.index or 0) + 1) % gpus)
    return policy_device


def feature_network_for(
    cfg: TrainConfig, source: nn.Module, device: torch.device, *, frozen_copy: bool = False, processes: int = 1
) -> FeatureNetwork:
    """The config's feature network over ``source`` (the policy, or a separately loaded base model) on its
    placement (``feature_placement``); ``frozen_copy``: a frozen copy of ``source`` with its adapter
    (``ebft.feature_network: warm_start``). ``processes``: how many processes train together."""
    placement = feature_placement(cfg.ebft.feature_device, device, processes=processes, gpus=visible_cuda_devices())
    return FeatureNetwork(
        source,
        layer_indices(cfg.ebft.feature_layers, causal_lm(source).config.num_hidden_layers),
        device=placement,
        autocast_dtype=autocast_dtype(cfg, device),
        frozen_copy=frozen_copy,
        dtype=feature_dtype(cfg, device),
    )


def state_placements(features: FeatureNetwork, accelerator) -> None:
    """Every process's feature-network placement, in the main process's log (a collective under several
    processes: all of them must call it)."""
    line = features.placement()
    if accelerator.num_processes == 1:
        log.info(line)
        return
    from accelerate.utils import gather_object

    lines = gather_object([f"process {accelerator.process_index}: {line}"])
    for entry in lines:
        log.info(entry)
