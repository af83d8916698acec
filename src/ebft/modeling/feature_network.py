"""The frozen feature network phi: hidden states of chosen layers, without gradient, from a truncated
view of the body."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn

from ebft.attention.packed import Packed, PackedPlan, packed_forward
from ebft.attention.strided import strided_backend, strided_forward
from ebft.features import layer_indices
from ebft.modeling.parts import backbone_of
from ebft.modeling.precision import autocast, autocast_dtype


def _truncated(body: nn.Module, depth: int) -> nn.Module:
    """A view of ``body`` that runs its first ``depth`` layers (at least one) and shares every weight with it.

    Only the module containers are new, so LoRA layers inside stay the policy's own (and
    ``disable_adapter`` still applies). Stopping at the deepest feature layer skips the rest of the
    network and the LM head (reference spec 11.2, item 4). Nothing else is changed: the view still ends
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
        body = backbone_of(policy)
        # The body's own output (after its final norm) is hidden state num_layers; every other one is read
        # from a layer, never from a truncated body's output.
        layers = getattr(body, "layers", None)
        self.num_layers = len(layers) if isinstance(layers, nn.ModuleList) else self.depth
        view = _truncated(body, self.depth)
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
        sequences (``ebft.attention.packed``); without one, ordinary causal sequences.
        """

        captured: dict[int, torch.Tensor] = {}
        layer_list = getattr(self.body, "layers", None)
        with ExitStack() as stack:
            stack.enter_context(self._policy.disable_adapter() if self.shared else nullcontext())
            stack.enter_context(_eval_mode(self.body))
            stack.enter_context(autocast(self.device, self.autocast_dtype))
            for idx in set(self.layers):
                if idx != self.num_layers:
                    stack.enter_context(_capture(layer_list, idx, captured))
            ids, pos = input_ids.to(self.device), position_ids.to(self.device)
            if plan is None:
                last = self.body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            elif isinstance(plan, PackedPlan):
                last = packed_forward(self.body, Packed(ids, pos, plan))
            else:
                stack.enter_context(strided_backend(self.body))
                last = strided_forward(self.body, ids, pos, plan)
        if self.depth == self.num_layers:
            captured[self.depth] = last  # post-norm, as output_hidden_states has it
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

    feature_device = torch.device(cfg.ebft.feature_device) if cfg.ebft.feature_device else device
    return FeatureNetwork(
        source,
        layer_indices(cfg.ebft.feature_layers, source.config.num_hidden_layers),
        device=feature_device,
        autocast_dtype=autocast_dtype(cfg, device),
        frozen_copy=frozen_copy,
    )
