"""Streaming ingestion: images arriving one by one join an open job as they come."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from db.engine import session_scope
from db.migrate import ensure_schema
from db.service import close_job, create_job, grow_job, record_items
from producer.config import get_producer_settings
from producer.submit import _wanted, send_items

log = logging.getLogger(__name__)


class StreamJob:
    """An open streaming job; each :meth:`send` adds one image and one task message.

    Use as a context manager: the job is closed on exit, and finishes once every image it
    received has a row.
    """

    def __init__(self, *, queue: str | None = None, source: str = "stream") -> None:
        from worker.app import app

        self.queue = queue or get_producer_settings().queue
        ensure_schema()
        with session_scope() as session:
            self.job_id = create_job(
                session, source=source, queue=self.queue, total=0, kind="stream"
            ).id
        self._conn = app.connection_for_write()
        self._producer = app.amqp.Producer(self._conn)
        self.sent = 0

    def send(self, path: str | os.PathLike) -> int:
        """Add one image file to the job; return its position."""
        submitted = time.time()
        with session_scope() as session:
            pos = grow_job(session, job_id=self.job_id, by=1)
            item = {"path": os.path.abspath(path), "t": submitted, "pos": pos}
            record_items(session, job_id=self.job_id, items=[item])
        send_items(self.job_id, [item], queue=self.queue, batch_size=1, producer=self._producer)
        self.sent += 1
        return pos

    def close(self) -> None:
        with session_scope() as session:
            close_job(session, job_id=self.job_id)
        self._conn.release()

    def __enter__(self) -> StreamJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lines_to_paths(lines: Iterable[str]) -> Iterator[str]:
    """Each non-blank line without its line ending: spaces belong to the file name."""
    for line in lines:
        line = line.removesuffix("\n").removesuffix("\r")
        if line.strip():
            yield line


def watch_folder(
    folder: str | os.PathLike,
    *,
    pattern: str | None = None,
    poll: float = 0.2,
    stop: threading.Event | None = None,
) -> Iterator[str]:
    """Yield each new file in *folder* once its size has stopped changing.

    Files present when this is called are skipped; stop by setting *stop*.
    """
    folder = Path(folder)
    seen = {e.path for e in os.scandir(folder)}  # now, not at the first next()
    return _watch(folder, seen, pattern, poll, stop or threading.Event())


def _watch(
    folder: Path, seen: set[str], pattern: str | None, poll: float, stop: threading.Event
) -> Iterator[str]:
    sizes: dict[str, int] = {}
    while not stop.is_set():
        for entry in os.scandir(folder):
            if entry.path in seen or not entry.is_file() or not _wanted(entry.name, pattern):
                continue
            size = entry.stat().st_size
            if sizes.get(entry.path) == size and size > 0:
                seen.add(entry.path)
                sizes.pop(entry.path)
                yield entry.path
            else:
                sizes[entry.path] = size
        stop.wait(poll)
