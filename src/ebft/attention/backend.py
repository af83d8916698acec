"""How ebft's own attention functions plug into transformers: registered by name through its public
``AttentionInterface``, with no mask built for them (their plan carries the masks), and selected on a model
only for the duration of a block."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


class _SwitchesAttention(Protocol):
    """A transformers model, or a PEFT wrapper, which forwards both attributes to the model it wraps."""

    config: PreTrainedConfig

    def set_attn_implementation(self, attn_implementation: str) -> None: ...


def _no_mask(*args, **kwargs) -> None:
    """The plan carries the masks, so transformers must not build a sequence x sequence one."""
    return None


def register(name: str, attention: Callable) -> str:
    """Make ``attention`` known to transformers as ``name`` (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _no_mask)
    return name


@contextmanager
def attention_backend(model: torch.nn.Module, name: str, attention: Callable) -> Iterator[None]:
    """Run ``model`` with ``attention`` (registered as ``name``) inside the block, its own backend outside."""
    switch = cast(_SwitchesAttention, model)
    previous = switch.config._attn_implementation
    switch.set_attn_implementation(register(name, attention))
    try:
        yield
    finally:
        switch.set_attn_implementation(previous)
