"""Submitted image bytes kept content-addressed (``SORTLINE_BYTES_DIR/ab/abcd...``), so that
`sortline review export` can copy photos that were sent as bytes, not as files.

The folder is kept under ``SORTLINE_BYTES_KEEP_MB``: every :data:`PRUNE_EVERY` writes, the
least recently submitted files are removed until it fits. No torch.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

PRUNE_EVERY = 64  # writes between two size checks of the folder, per process
_SHA = re.compile(r"[0-9a-f]{64}")
_writes = 0


def path_of(root: str | Path, sha256: str) -> Path:
    """Where the bytes of *sha256* live under *root*."""
    if not _SHA.fullmatch(sha256 or ""):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return Path(root) / sha256[:2] / sha256


def keep(root: str | Path, sha256: str, data: bytes, *, max_bytes: int) -> Path:
    """Store *data* under its sha256 (once; a repeat submission refreshes its time); prune."""
    global _writes
    p = path_of(root, sha256)
    if p.exists():
        os.utime(p)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
    _writes += 1
    if _writes % PRUNE_EVERY == 1:
        prune(root, max_bytes=max_bytes)
    return p


def find(root: str | Path | None, sha256: str | None) -> Path | None:
    """The stored file of *sha256*, or None (no folder configured, not kept, or pruned)."""
    if not root or not sha256:
        return None
    try:
        p = path_of(root, sha256)
    except ValueError:
        return None
    return p if p.is_file() else None


def prune(root: str | Path, *, max_bytes: int) -> int:
    """Remove the least recently submitted files until the folder holds at most *max_bytes*;
    return how many were removed."""
    files = []
    for d in Path(root).glob("[0-9a-f][0-9a-f]"):
        for p in d.iterdir():
            if _SHA.fullmatch(p.name):
                try:
                    st = p.stat()
                except FileNotFoundError:  # pruned by another process
                    continue
                files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, p in sorted(files):
        if total <= max_bytes:
            break
        p.unlink(missing_ok=True)
        total -= size
        removed += 1
    if removed:
        log.info("bytes store %s: removed %d oldest files to stay under %d bytes", root, removed,
                 max_bytes)  # fmt: skip
    return removed
