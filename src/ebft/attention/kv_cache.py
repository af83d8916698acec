"""A KV cache whose attention layers write each decoding step in place.

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every step copies the
whole cache into a freshly allocated tensor (and, past glibc's mmap threshold, into freshly faulted pages).
Decoding small models on CPU spent about half its time there. ``PreallocatedLayer`` keeps buffers sized for
the whole generation, writes the new positions into them and hands attention a view of the filled part:
the same keys and values, in the same order, without the copies.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for ``capacity`` positions (it grows, doubling, if a call
    needs more). ``keys`` / ``values`` are views [B, H, length, d] of the buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

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

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.length, key_states.shape[-2]
        if n + q > self._keys.shape[-2]:
            self._resize(None, max(n + q, 2 * self._keys.shape[-2]))
        self._keys[:, :, n : n + q] = key_states
        self._values[:, :, n : n + q] = value_states
        self.length = n + q
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._resize(beam_idx.to(self.device), self._keys.shape[-2])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._keys.shape[0], device=self.device).repeat_interleave(repeats)
            self.reorder_cache(rows)

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


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are ``PreallocatedLayer``s of ``capacity`` positions.

    With ``config``: the layers transformers builds from it, every plain ``DynamicLayer`` replaced (sliding-window,
    linear-attention and other layers stay as they are). Without: one preallocated layer for each layer that
    writes to the cache, every one keeping all its keys.
    """

    def __init__(self, capacity: int, *, config=None):
        super().__init__(config=config)
        if config is None:
            self.layer_class_to_replicate = partial(PreallocatedLayer, capacity)
        else:
            self.layers = [PreallocatedLayer(capacity) if type(x) is DynamicLayer else x for x in self.layers]
