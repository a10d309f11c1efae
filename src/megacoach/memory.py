"""Process memory: stop the C allocator from keeping freed tensor memory (an edge: one libc call).

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


def set_mmap_threshold(mib: float | None) -> bool:
    """Serve allocations of at least `mib` MiB with mmap (given back to the system when freed). None: leave the
    allocator alone. Returns True if it was set (glibc on Linux), False where there is no such allocator."""
    if mib is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mib * 2 ** 20)))
