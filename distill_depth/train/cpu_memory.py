"""Keep freed host memory in the process on a CPU device (glibc's malloc).

glibc serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` on free. A training step on a CPU allocates and frees the same large
activations every step (U at 640×192, batch 4: ~700 MB of them), so every step the kernel maps
those pages again and faults each one in: ~180,000 minor page faults and ~0.3 s of system time per
U step on the 2-core machine of docs/benchmarks.md, 9 % of the step. With mmap off
(``M_MMAP_MAX`` 0) and the heap never trimmed (``M_TRIM_THRESHOLD``), freed blocks stay in the
heap and the next step reuses them: the faults go to ~0, and the peak resident set measured the
same (a heap holds what the step needs at its peak either way).
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide, from now on; calling it again
    sets the same values); True if it did, False without glibc (macOS, Windows; musl's mallopt
    does nothing): the allocator stays as it was."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # a trim threshold of -1 turns trimming off (mallopt(3)); an int cannot say more than 2 GiB
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
        log.warning("train.keep_cpu_memory: mallopt refused (not glibc?); the allocator is unchanged")
        return False
    return True
