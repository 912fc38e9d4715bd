"""Process-wide allocator policy for inference: keep freed memory for reuse.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and hands it back to the kernel on ``free``. A volume pipeline allocates many such
buffers per case (a 240x240x155 float32 volume is 36 MB; read, orient, crop, normalise,
slice stacks, probabilities, inversion to the source grid...), and each one is new memory
the kernel must map and zero page by page on first touch. On a BraTS case that was about
88,000 page faults for the work around the network (read, preprocess, slice stacks,
inversion, post-processing, writing); with the policy below about 4,000, and that work ran
1.16x faster (``benchmarks/bench_allocator.py``, docs/benchmarks.md).

:func:`keep_freed_memory` tells glibc to serve large requests from its heap
(``M_MMAP_MAX = 0``) and not to trim the heap on ``free`` (``M_TRIM_THRESHOLD``), so a buffer
freed by one case is reused by the next without new page faults. The same buffers exist at
the same time, so the peak grows only by the heap's fragmentation (960 -> 1089 MB over 36
BraTS cases, flat from the first pass on); what changes is that the process keeps its
high-water mark until it exits instead of returning freed pages to the system. That suits a batch
inference process; a long-lived server embedding medseg next to other work can leave it off
(``InferenceConfig.keep_freed_memory``). No-op (returns False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest int mallopt takes: trim only a free top of the heap above 2 GiB

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring). Idempotent; process-wide.

    Returns True when the policy is in effect (now or from an earlier call), False where it
    cannot be applied (not glibc, or ``mallopt`` refused).
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        log.debug("mallopt refused the allocator policy; keeping glibc's defaults")
        return False
    _applied = True
    return True
