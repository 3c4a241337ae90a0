"""Fixed glibc malloc thresholds for CPU timings.

By default glibc serves large blocks (a batch of patches is several MiB) with ``mmap`` and raises that
threshold, and the one for returning freed memory to the system, as blocks are freed: whether a call pays
thousands of page faults for fresh pages then depends on what ran before it in the process.  Interleaving
ours and the baselines made that history differ from round to round and run to run: our gather forward
measured 0.74 ms in one run and 1.31 ms in the next, while the batched ``grid_sample`` baseline faulted on
about 4,000 pages in every call.  Fixed thresholds (blocks up to 32 MiB from the heap, freed memory kept)
give every implementation its steady state with no page faults, which is what a long training loop sees and
what a caching allocator (jemalloc, tcmalloc) gives.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest int: freed heap memory is not given back during a benchmark


def fix_malloc_thresholds() -> str:
    """Set the thresholds; returns a description for the results ("default" where glibc is not in use)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "default (no glibc mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        return "default (mallopt refused the thresholds)"
    return "glibc, mmap threshold 32 MiB, no trimming"
