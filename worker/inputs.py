"""Task messages and image references: validation, allowed roots, size limits."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.text import is_job_id
from sortline.errors import SortlineError

SCHEMA_VERSION = 1
MAX_ITEMS = 512  # images in one task message at most (`submit --batch-size` allows 512)
SALVAGE_ITEMS = 10_000  # positions a rejected message may still get error rows for
MAX_POSITION = 2**31 - 1  # positions are 32-bit integers in the database
MAX_PATH_BYTES = 4095  # PATH_MAX less the terminating NUL


class MessageError(SortlineError, ValueError):
    """A task message that cannot be processed at all (wrong schema, missing fields)."""


class InputError(SortlineError, ValueError):
    """One image reference that cannot be read; the message names the problem."""


@dataclass(frozen=True)
class Item:
    pos: int
    ref: str  # the path, or the content key of submitted bytes
    path: str | None = None
    data_b64: str | None = None
    submitted_at: float | None = None


@dataclass(frozen=True)
class Message:
    job_id: str
    items: list[Item]
    submitted_at: float | None


def build_message(job_id: str, items: list[dict[str, Any]], submitted_at: float) -> dict:
    """The JSON body of one classify task (the producer's side of :func:`parse_message`)."""
    return {"v": SCHEMA_VERSION, "job_id": job_id, "submitted_at": submitted_at, "items": items}


def task_summary(job_id: str, items: Sequence[dict], names: int = 3) -> str:
    """How a task shows in Flower: ``job 1a2b3c4d: 16 images (a.jpg, b.jpg, c.jpg, ...)``."""
    shown = [
        display_ref(os.path.basename(it["path"]) if "path" in it else it.get("key", "?"))[:60]
        for it in items[:names]
    ]
    more = ", ..." if len(items) > names else ""
    return f"job {job_id[:8]}: {len(items)} images ({', '.join(shown)}{more})"


def display_ref(ref: str) -> str:
    """*ref* as text any database accepts: undecodable bytes and NULs shown escaped.

    A non-UTF-8 file name arrives with surrogate escapes (``caf\\udce9.jpg``); it is stored
    as ``caf\\xe9.jpg``, while the worker still opens the file by its real name.
    """
    try:
        text = ref.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates
        text = ref.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def _timestamp(v: Any) -> float | None:
    """A plausible epoch time, or None (never NaN, infinite or out of datetime's range)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if 0 < v < 32_503_680_000 else None  # before the year 3000


def _position(it: dict) -> int | None:
    pos = it.get("pos")
    if isinstance(pos, int) and not isinstance(pos, bool) and 0 <= pos <= MAX_POSITION:
        return pos
    return None


def parse_message(raw: Any) -> Message:
    """Validate a task message; raise :class:`MessageError` naming what is wrong."""
    if not isinstance(raw, dict):
        raise MessageError(f"message must be a JSON object, not {type(raw).__name__}")
    v = raw.get("v")
    if v != SCHEMA_VERSION:
        raise MessageError(
            f"unknown message schema version {v!r} (this worker reads {SCHEMA_VERSION})"
        )
    job_id = raw.get("job_id")
    if not is_job_id(job_id):
        raise MessageError("message has no valid 'job_id' (32 hex digits)")
    items = raw.get("items")
    if not isinstance(items, list) or not items:
        raise MessageError("message has no 'items' list")
    if len(items) > MAX_ITEMS:
        raise MessageError(f"message has {len(items)} items; at most {MAX_ITEMS} are accepted")
    sub = _timestamp(raw.get("submitted_at"))
    out: list[Item] = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise MessageError(f"item {i} is not an object")
        pos = _position(it)
        if pos is None:
            raise MessageError(f"item {i} has no valid 'pos' (an integer from 0 to {MAX_POSITION})")
        path, data = it.get("path"), it.get("data")
        item_sub = _timestamp(it.get("t")) or sub
        if isinstance(path, str):
            out.append(Item(pos=pos, ref=display_ref(path), path=path, submitted_at=item_sub))
        elif isinstance(data, str):
            key = it["key"] if isinstance(it.get("key"), str) else f"bytes:{pos}"
            out.append(
                Item(pos=pos, ref=display_ref(key[:1000]), data_b64=data, submitted_at=item_sub)
            )
        else:
            raise MessageError(f"item {i} (pos {pos}) has neither 'path' nor 'data'")
    if len({it.pos for it in out}) != len(out):
        raise MessageError("message repeats a position")
    return Message(job_id=job_id, items=out, submitted_at=sub)


def salvage(raw: Any) -> tuple[str, list[Item]] | None:
    """From a message :func:`parse_message` rejected, the job and positions it names, if any.

    The worker records an error row for each, so the job still completes and says why.
    """
    if not isinstance(raw, dict):
        return None
    job_id = raw.get("job_id")
    items = raw.get("items")
    if not is_job_id(job_id) or not isinstance(items, list):
        return None
    out: dict[int, Item] = {}
    for it in items[:SALVAGE_ITEMS]:
        if not isinstance(it, dict) or (pos := _position(it)) is None or pos in out:
            continue
        ref = next((it[k] for k in ("path", "key") if isinstance(it.get(k), str)), f"pos:{pos}")
        out[pos] = Item(pos=pos, ref=display_ref(ref[:1000]), submitted_at=_timestamp(it.get("t")))
    return (job_id, list(out.values())) if out else None


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def read_item(item: Item, *, roots: list[Path], max_bytes: int) -> bytes:
    """The bytes an item refers to, or :class:`InputError`."""
    if item.data_b64 is not None:
        if len(item.data_b64) > (max_bytes * 4) // 3 + 4:
            raise InputError(
                f"image bytes too large: about {len(item.data_b64) * 3 // 4} bytes exceeds "
                f"the limit of {max_bytes} (SORTLINE_MAX_IMAGE_BYTES)"
            )
        try:
            return base64.b64decode(item.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image data is not valid base64") from None
    assert item.path is not None
    raw = item.path
    if "\x00" in raw:
        raise InputError("path contains a NUL byte")
    if len(os.fsencode(raw)) > MAX_PATH_BYTES:
        raise InputError(
            f"path too long: {len(os.fsencode(raw))} bytes, the system allows {MAX_PATH_BYTES}: "
            f"{_shown(raw)}"
        )
    p = Path(os.fsdecode(os.fsencode(raw)))  # surrogate-escaped non-UTF-8 names round-trip
    if not p.is_absolute():
        raise InputError(f"path is not absolute: {_shown(raw)}")
    try:
        resolved = p.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # symlink loops
        why = getattr(e, "strerror", None) or e
        raise InputError(f"cannot resolve path {_shown(raw)}: {why}") from None
    if roots and not _under(resolved, roots):
        via = f" (a link resolving to {resolved})" if resolved != p else ""
        raise _outside(raw, roots, via)
    # Open what was checked, not what the path may point at by now: no link as the last
    # component, no blocking on a FIFO, and the open file's real path checked again.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        raise InputError(f"file not found: {_shown(raw)}") from None
    except OSError as e:  # ELOOP: a link put in its place after it was resolved
        raise InputError(f"cannot read {_shown(raw)}: {e.strerror}") from None
    try:
        if roots:
            real = _fd_path(fd)
            if real is not None and not _under(real, roots):
                raise _outside(raw, roots, f" (opened as {real})")
        return read_open_file(fd, _shown(raw), max_bytes=max_bytes)
    finally:
        os.close(fd)


def read_open_file(fd: int, shown: str, *, max_bytes: int) -> bytes:
    """At most *max_bytes* of a regular file open as *fd*, checked before anything is read.

    A directory, FIFO, socket or device (``/dev/zero``) is refused from ``fstat``, a file
    whose size is over the limit (a sparse 20 GB file too) before it is read, and the read
    itself stops one byte past the limit, in case the file grows meanwhile.
    """
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"is a directory, not an image file: {shown}")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"not a regular file: {shown}")
        if st.st_size > max_bytes:
            raise InputError(
                f"file too large: {st.st_size} bytes exceeds the limit of {max_bytes} "
                "(SORTLINE_MAX_IMAGE_BYTES)"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"cannot read {shown}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise InputError(f"file too large: exceeds the limit of {max_bytes} bytes")
    return data


def read_local_file(path: str, *, max_bytes: int) -> bytes:
    """The bytes of an image file named on this machine (``submit --bytes``), bounded."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise InputError(f"path too long: {len(os.fsencode(path))} bytes: {_shown(path)}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO never blocks
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"file not found: {_shown(path)}") from None
    except OSError as e:
        raise InputError(f"cannot read {_shown(path)}: {e.strerror}") from None
    try:
        return read_open_file(fd, _shown(path), max_bytes=max_bytes)
    finally:
        os.close(fd)


def read_stream(stream, *, max_bytes: int) -> bytes:
    """At most *max_bytes* from a binary stream (stdin), or :class:`InputError`."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"input too large: exceeds the limit of {max_bytes} bytes")
    return data


def _shown(raw: str, limit: int = 200) -> str:
    """*raw* for a message: quoted, control characters escaped, long ones shortened."""
    text = display_ref(raw)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _outside(raw: str, roots: list[Path], via: str = "") -> InputError:
    return InputError(
        f"path outside the allowed roots{via}: {_shown(raw)}; allowed: "
        + ", ".join(str(r) for r in roots)
        + " (SORTLINE_ALLOWED_ROOTS)"
    )


def _fd_path(fd: int) -> Path | None:
    """The real path of an open file (Linux), or None where the system cannot say."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_stored_ref(ref: str) -> bytes:
    """The image file a result row names, read under the workers' rules: an absolute path
    inside ``SORTLINE_ALLOWED_ROOTS``, a regular file, within ``SORTLINE_MAX_IMAGE_BYTES``
    (for ``sortline report`` and ``review export``, which run wherever a person runs them)."""
    from worker.config import get_worker_settings

    s = get_worker_settings()
    item = Item(pos=0, ref=ref, path=ref)
    return read_item(item, roots=s.resolved_roots(), max_bytes=s.max_image_bytes)
