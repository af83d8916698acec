"""A KV cache whose attention layers write each decoding step in place.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every step copies the
whole cache into a freshly allocated tensor (and, past glibc's mmap threshold, into freshly faulted pages).
Decoding small models on CPU spent about half its time there. ``PreallocatedLayer`` keeps buffers sized for
the whole generation, writes the new positions into them and hands attention a view of the filled part:
the same keys and values, in the same order, without the copies.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for ``capacity`` positions (it grows, doubling, if a call
    needs more). ``keys`` / ``values`` are views [B, H, length, d] of the buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        # Empty until the first update sizes them (``is_initialized``).
        self._keys = torch.empty(0)
        self._values = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, H, q, _ = key_states.shape
        size = max(self.capacity, q)
        self._keys = key_states.new_empty(B, H, size, key_states.shape[-1])
        self._values = value_states.new_empty(B, value_states.shape[1], size, value_states.shape[-1])
        self.is_initialized = True

    def _resize(self, rows: torch.Tensor | None, size: int) -> None:
        """New buffers of ``size`` positions holding the filled part of rows ``rows`` (all rows: None)."""
        n = self.length
        keys, values = self._keys[:, :, :n], self._values[:, :, :n]
        if rows is not None:
            keys, values = keys[rows], values[rows]
        self._keys = keys.new_empty(*keys.shape[:2], size, keys.shape[-1])
        self._values = values.new_empty(*values.shape[:2], size, values.shape[-1])
        self._keys[:, :, :n] = keys
        self._values[:, :, :n] = values
        self._expose()

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Point ``keys`` / ``values`` at the filled part of the buffers; returns those views."""
        keys, values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.length, key_states.shape[-2]
        if n + q > self._keys.shape[-2]:
            self._resize(None, max(n + q, 2 * self._keys.shape[-2]))
        self._keys[:, :, n : n + q] = key_states
        self._values[:, :, n : n + q] = value_states
        self.length = n + q
        return self._expose()

    def get_seq_length(self) -> int:
        return self.length

    def _select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` of the batch (in that order, repeats allowed)."""
        if self.is_initialized:
            self._resize(rows.to(self.device), self._keys.shape[-2])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self._keys.shape[0], device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative integer, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove:
            self.length = max(self.length + tokens_to_remove, 0)
            self._expose()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._expose()


def _layer_class(capacity: int) -> type[PreallocatedLayer]:
    """``PreallocatedLayer`` of ``capacity`` positions as a class made with no arguments: a cache makes the
    layer of each new layer index by calling its ``layer_class_to_replicate``."""

    class Layer(PreallocatedLayer):
        def __init__(self) -> None:
            super().__init__(capacity)

    return Layer


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are ``PreallocatedLayer``s of ``capacity`` positions.

    With ``config``: the layers transformers builds from it, every plain ``DynamicLayer`` replaced (sliding-window,
    linear-attention and other layers stay as they are). Without: one preallocated layer for each layer that
    writes to the cache, every one keeping all its keys.
    """

    def __init__(self, capacity: int, *, config: PreTrainedConfig | None = None):
        super().__init__(config=config)
        if config is None:
            self.layer_class_to_replicate = _layer_class(capacity)
        else:
            self.layers = [PreallocatedLayer(capacity) if type(x) is DynamicLayer else x for x in self.layers]
