"""Process memory: stop the C allocator from keeping freed tensor memory (an edge: libc calls).

Two levers. `release_free_memory` (`run.release_memory`, on by default) hands the heap's free pages back to the
system between PPO's phases (glibc malloc_trim(3)): what one phase freed is not kept resident while the next
phase allocates its own shapes, and nothing is page-faulted in any more often than it would be anyway.
`set_mmap_threshold` changes where every large allocation comes from, which costs time (below).

glibc's malloc serves a large block with mmap and gives it back to the system when it is freed, but after every
such free it raises its own threshold (up to 32 MiB), so that from then on tensors of a few MiB — activations,
logits chunks — come from the heap, which fragments and is not given back. Setting the threshold explicitly
switches the dynamic adjustment off (mallopt(3)); results are unchanged, only where memory comes from.

It is a trade, off by default (`run.mmap_threshold_mib`): at benchmarks/ppo_iteration.py's size 2 a 1 MiB threshold
cut peak RSS from 1222 to 1034 MiB but made an iteration 49% slower (10.7 -> 15.9 s), since every large tensor is
then page-faulted in afresh; 16 MiB: 1157 MiB, +10%.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt(3) parameter number in glibc's malloc.h
_libc_cache: list = []


def _libc():
    """glibc's malloc functions (mallopt, malloc_trim), or None where the C library has none (musl, macOS...)."""
    if not _libc_cache:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                lib = None
        _libc_cache.append(lib)
    return _libc_cache[0]


def set_mmap_threshold(mib: float | None) -> bool:
    """Serve allocations of at least `mib` MiB with mmap (given back to the system when freed). None: leave the
    allocator alone. Returns True if it was set (glibc on Linux), False where there is no such allocator."""
    libc = _libc() if mib is not None else None
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mib * 2 ** 20)))


def release_free_memory() -> bool:
    """Give the C heap's free pages back to the system (malloc_trim(0): the top of the heap is shrunk and free
    pages inside it are discarded). Live memory is untouched. Returns True if anything was given back; False
    also where the C library has no malloc_trim."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
