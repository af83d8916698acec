"""Keep freed activation memory from piling up in glibc's heap during a training forward pass (Linux).

A forward pass with autograd allocates two kinds of tensors, interleaved: ones that live until the
backward pass (activations saved for it, or with gradient checkpointing each layer's input) and
short-lived ones (everything else a layer computes). glibc serves blocks below its mmap threshold
(which it raises on its own up to 32 MiB) from one heap; a long-lived block placed above freed ones
pins them, so the heap grows by about a layer's temporaries per layer and its pages stay resident. On
SmolLM2-135M (a strided LoRA step at sequence_len 256) that was over 1 GB of freed memory held by the
process, as much as the live activations themselves (benchmarks/RESULTS.md).

Inside :func:`large_blocks_from_mmap`, blocks of at least ``threshold`` bytes that the heap's free
chunks cannot serve come from their own mmap and go back to the operating system when freed, so nothing
pins them (glibc reuses a fitting free chunk of any size first: that memory is already held). Faulting fresh pages costs
time, which is why it covers only the forward pass (fewer, longer-lived blocks) and not the backward.

Afterwards the thresholds are set to glibc's steady state rather than to their previous values, which
glibc cannot report (``mallopt`` only writes). That is safe because it is where glibc's own dynamic
adjustment ends anyway: without a ``mallopt`` call, every free of an mmapped block larger than the
current threshold raises the threshold to that block's size, capped at 32 MiB on 64-bit systems, and the
trim threshold to twice it. A training step reaches the cap before its first policy pass: on SmolLM2 a
31 MiB block still came from mmap after the model had loaded, but from the heap once the first
generation and feature passes had run (they free mmapped blocks of about 32 MiB). Fixing the value
there only stops further adjustment, of which past the cap there is none.

It does nothing where it would override a choice or cannot work: when the environment tunes glibc's
thresholds itself (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or those names in
``GLIBC_TUNABLES``, whose values are then the user's to keep), and on other C libraries and systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from contextlib import contextmanager
from functools import lru_cache

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Large enough to cover a layer's hidden states at realistic shapes (SmolLM2, 1,248 packed tokens: 2.9 MB).
FORWARD_THRESHOLD = 2 * 2**20
# What glibc's own adjustment converges to on 64-bit systems once large blocks have been freed (its
# DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming); set explicitly afterwards because any mallopt
# call switches that adjustment off for good.
STEADY_MMAP_THRESHOLD = 32 * 2**20
STEADY_TRIM_THRESHOLD = 2 * STEADY_MMAP_THRESHOLD


# Environment settings with which glibc fixes the thresholds at start-up (mallopt(3), tunables(7)).
USER_THRESHOLD_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_THRESHOLD_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def thresholds_set_by_user(environ=os.environ) -> bool:
    """Whether the environment sets glibc's mmap or trim threshold (then they are left as the user chose)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in USER_THRESHOLD_SETTINGS) or any(
        t in tunables for t in USER_THRESHOLD_TUNABLES
    )


@lru_cache(maxsize=1)
def _glibc():
    """The process's glibc with ``mallopt``, or None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


@contextmanager
def large_blocks_from_mmap(threshold: int = FORWARD_THRESHOLD):
    """Serve allocations of ``threshold`` bytes or more from mmap while the block runs (glibc only, and only
    when the environment leaves glibc's thresholds to it: see the module docstring)."""
    libc = _glibc()
    if libc is None or thresholds_set_by_user():
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
