"""training.fit.memory: glibc keeps large blocks on its heap while sortline adapt runs."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from training.fit.memory import _mallopt, keep_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mmapped_bytes() -> int:
    fn = ctypes.CDLL(None).mallinfo2
    fn.restype = _Mallinfo2
    return int(fn().hblkhd)


@pytest.mark.skipif(
    _mallopt() is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="not glibc's allocator, or one older than 2.33 (no mallinfo2)",
)
def test_large_blocks_come_from_the_heap_inside_and_from_mmap_again_after():
    # np.empty: address space only, no page is touched. 2 GB: more than the heap keeps free
    # (1 GB inside the block), so where the block is not taken it would be mmapped
    size = 2 * 1024 * 1024 * 1024
    with keep_freed_memory() as ok:
        assert ok
        before = _mmapped_bytes()
        b = np.empty(size, np.uint8)
        assert _mmapped_bytes() - before < size  # from the heap
        del b
    # glibc's defaults are back: a block larger than all the heap may have kept is mmapped
    big = 4 * 1024 * 1024 * 1024
    before = _mmapped_bytes()
    c = np.empty(big, np.uint8)
    assert _mmapped_bytes() - before >= big
    del c


def test_off_the_main_thread_nothing_changes():
    import threading

    seen: list[bool] = []

    def run():
        with keep_freed_memory() as ok:
            seen.append(ok)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [False]
