"""Keeping freed host memory for reuse while a CPU job allocates the same large tensors every step.

glibc's malloc hands allocations above its mmap threshold (at most 32 MB) to fresh ``mmap``s and
unmaps them when freed, and trims the heap's free top back to the kernel. A CPU training step
allocates and frees the same tens of large activations every step, so each step faults all of
their pages in again, zero-filled by the kernel: 330,000 page faults per fp32 step of the
downstream U-Net at 256 px, batch 8, and about a fifth of the step's time on an AVX2 EPYC
(``bench.bench_downstream_step``; how many depends on what the process allocated before). Inside
``reused_host_memory()`` malloc neither maps nor trims, so freed blocks serve the next step's
allocations; on leaving, the defaults come back and the kept memory is returned to the kernel.
(One thing stays: any explicit mallopt ends glibc's dynamic mmap threshold for the process, which
then keeps the threshold it had reached.)

Elsewhere than glibc (musl, macOS) it does nothing: those allocators are not tuned through mallopt.
"""

import ctypes
import ctypes.util
import functools
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters and glibc's defaults for them (malloc.h, mallopt(3))
M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD = -1, 128 * 1024
M_MMAP_MAX, DEFAULT_MMAP_MAX = -4, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only a free top of 2 GB or more

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _set(libc: ctypes.CDLL, mmap_max: int, trim_threshold: int) -> None:
    libc.mallopt(M_MMAP_MAX, mmap_max)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


@contextmanager
def reused_host_memory() -> Iterator[None]:
    """Inside: freed memory stays in the process for reuse (nested uses share one setting)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _set(libc, 0, NEVER_TRIM)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(libc, DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
