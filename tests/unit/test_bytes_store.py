"""Submitted bytes kept content-addressed, with a size limit (SORTLINE_BYTES_DIR)."""

from __future__ import annotations

import hashlib
import os

import pytest

from worker import bytes_store


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_keep_find_and_prune_oldest_first(tmp_path):
    blobs = [bytes([i]) * 1000 for i in range(5)]
    for i, b in enumerate(blobs):
        p = bytes_store.keep(tmp_path, _sha(b), b, max_bytes=10**9)
        os.utime(p, (1000 + i, 1000 + i))  # submitted in this order
        assert p == tmp_path / _sha(b)[:2] / _sha(b) and p.read_bytes() == b
    assert bytes_store.find(tmp_path, _sha(blobs[2])).read_bytes() == blobs[2]
    assert bytes_store.prune(tmp_path, max_bytes=2500) == 3
    assert [bytes_store.find(tmp_path, _sha(b)) is not None for b in blobs] == [0, 0, 0, 1, 1]


def test_find_without_a_folder_or_with_a_bad_key(tmp_path):
    assert bytes_store.find("", "a" * 64) is None
    assert bytes_store.find(tmp_path, "../../etc/passwd") is None
    assert bytes_store.find(tmp_path, "a" * 64) is None
    with pytest.raises(ValueError, match="not a sha256"):
        bytes_store.path_of(tmp_path, "../x")
