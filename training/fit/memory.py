"""glibc's allocator and PyTorch on a CPU: keep freed memory for the next batch.

glibc serves an allocation above its mmap threshold (at most 32 MB, however it moves) with a
fresh ``mmap`` and gives it back with ``munmap`` when freed, so every batch of a network at
260 px pays again for the page faults of its activations. With ``mmap`` off and freed memory
kept (up to 1 GB) the same tensors come from the heap. On two cores (2026-12-08, one run
each): a step of `sortline adapt`'s fine-tune at 260 px took 0.83-0.85 s instead of
0.92-0.95 and at 192 px 0.46 s instead of 0.51 (``bench/adapt_steps.py --allocator
default,kept``); a forward pass of Lite2 at 260 px in batches of 16, 18-20 ms a photo instead
of 29-34 from the third batch on (a throwaway script). Once a process has trained, its
heap has grown and the default is as fast; before, it is not, so the budget of `sortline
adapt`, which times forward passes before its fine-tune, took the passes after it for three
times what they took (seed 63 of ``bench/adapt.py``: 157 s estimated, about 50 s taken).
Used around `sortline adapt`, which runs its tensors in the main thread, where the heap grows
without limit (another thread's arena cannot hold more than 64 MB without ``mmap``, so this
is not for threaded servers, and off the main thread it changes nothing).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults, restored afterwards
DEFAULT_MMAP_MAX = 65536


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt  # glibc's; musl and others have none
    except (OSError, AttributeError):
        return None


@contextmanager
def keep_freed_memory(trim_threshold: int = 1 << 30) -> Iterator[bool]:
    """Within the block, large allocations come from the heap and freed memory stays in the
    process (up to *trim_threshold* bytes). Yields whether the allocator took the settings
    (False where it is not glibc's, or off the main thread: then nothing changes)."""
    main = threading.current_thread() is threading.main_thread()
    mallopt = _mallopt() if main else None
    ok = bool(mallopt and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if mallopt and not ok:
        log.debug("mallopt refused the settings; the allocator is left as it was")
    try:
        yield ok
    finally:
        if mallopt:
            mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
