"""``large_blocks_from_mmap``: inside it, big blocks come from mmap (returned to the system when freed);
afterwards glibc's heap serves them again. Observed through glibc's own accounting (mallinfo2)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from ebft.allocator import _glibc, large_blocks_from_mmap

libc = _glibc()
pytestmark = pytest.mark.skipif(
    libc is None or not hasattr(libc, "mallinfo2"), reason="glibc >= 2.33 only (mallopt, mallinfo2)"
)


_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]  # hblkhd: bytes held in mmapped blocks


def _mmapped_bytes() -> int:
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _mmapped_by_a_new_tensor(nbytes: int) -> int:
    before = _mmapped_bytes()
    block = torch.empty(nbytes, dtype=torch.uint8)
    grown = _mmapped_bytes() - before
    del block
    return grown


def test_big_blocks_are_mmapped_inside_and_heap_allocated_after():
    four_mb = 4 * 2**20
    with large_blocks_from_mmap():
        assert _mmapped_by_a_new_tensor(four_mb) >= four_mb
        assert _mmapped_by_a_new_tensor(2**20) == 0  # below the 2 MiB threshold: the heap, as before
    # Restored to glibc's steady state (32 MiB): a 4 MiB block is the heap's again.
    assert _mmapped_by_a_new_tensor(four_mb) == 0
    assert _mmapped_by_a_new_tensor(64 * 2**20) >= 64 * 2**20
