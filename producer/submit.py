"""Create a job, cut it into small JSON task messages and send them to a queue."""

from __future__ import annotations

import base64
import glob
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatch

import redis

from db.engine import session_scope
from db.migrate import ensure_schema
from db.service import FINAL, create_job, end_job, get_job, record_items
from producer.config import IMAGE_EXTENSIONS, get_producer_settings
from sortline.errors import SortlineError
from sortline.names import CLASSIFY_TASK, INFERENCE_QUEUES
from worker.inputs import build_message, display_ref, task_summary
from worker.queues import IMAGES_HEADER, queued_images

log = logging.getLogger(__name__)

TASK = CLASSIFY_TASK
ROOM_POLL = 0.05  # seconds between looks at a full queue


class NothingToDo(SortlineError, ValueError):
    """The paths named no image."""


class QueueFull(SortlineError):
    """The queue has no room for a job that was told not to wait for it."""


WHEN_FULL = ("wait", "refuse")


def _room_check(queue: str, limit: int, *, client) -> Callable[[int], None]:
    """A function that blocks until *queue* has room for *n* more images under *limit*."""
    warned = False

    def depth() -> int:
        try:
            return queued_images(queue, client=client)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            # the broker is away for a moment: the send that follows retries until it is back
            log.warning("cannot count queue %s (%s); sending without waiting for room", queue, e)
            return 0

    def wait(n: int) -> None:
        nonlocal warned
        while (queued := depth()) + n > limit and queued > 0:
            if not warned:
                log.warning("queue %s holds %d images (SORTLINE_MAX_QUEUED=%d); waiting for "
                            "the workers to take some", queue, queued, limit)  # fmt: skip
                warned = True
            time.sleep(ROOM_POLL)

    return wait


def queue_depth(queue: str) -> dict:
    """Images waiting on *queue*, and the producers' limit (``SORTLINE_MAX_QUEUED``, 0: none)."""
    return {
        "queue": queue,
        "images": queued_images(queue),
        "limit": get_producer_settings().max_queued,
    }


def queue_line(queue: str, depth: dict | None) -> str:
    """One line for people: how full *queue* is."""
    if depth is None:
        return f"queue {queue}: depth unknown"
    limit = f" of at most {depth['limit']}" if depth["limit"] else " (no limit)"
    return f"queue {queue}: {depth['images']} images waiting{limit}"


def refuse_if_full(queue: str, n: int) -> None:
    """Raise :class:`QueueFull` unless *queue* has room for *n* more images right now."""
    limit = get_producer_settings().max_queued
    if not limit:
        return
    queued = queued_images(queue)
    if queued + n > limit:
        raise QueueFull(
            f"queue {queue} holds {queued} images and SORTLINE_MAX_QUEUED is {limit}: no room "
            f"for {n} more; submit again when the workers have caught up, or without "
            "--when-full refuse to wait for room"
        )


class MissingPaths(SortlineError, FileNotFoundError):
    """Local paths that do not exist here."""


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _wanted(name: str, pattern: str | None) -> bool:
    if pattern:
        return fnmatch(name, pattern)
    return name.lower().endswith(IMAGE_EXTENSIONS)


def expand_paths(
    paths: Iterable[str | os.PathLike],
    *,
    recursive: bool = False,
    pattern: str | None = None,
    worker_paths: bool = False,
) -> list[str]:
    """Files named by *paths* (files, folders, globs) as absolute paths, in a stable order.

    A path that does not exist here is refused (:class:`MissingPaths`), unless
    *worker_paths*: then it is kept as it is, for workers that see files this machine does
    not, and a worker records an error row if it cannot read it either.
    """
    out: list[str] = []
    missing: list[str] = []
    for raw in paths:
        p = os.fspath(raw)
        if _is_glob(p) and not os.path.exists(p):
            matches = sorted(glob.glob(p, recursive=recursive))
            if not matches:
                raise NothingToDo(f"no file matches {p!r}")
            out.extend(os.path.abspath(m) for m in matches if os.path.isfile(m))
        elif os.path.isdir(p):
            walker = os.walk(p) if recursive else [next(os.walk(p))]
            found: list[str] = []
            for root, dirs, files in walker:
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files) if _wanted(f, pattern))
            out.extend(os.path.abspath(f) for f in found)
        else:
            if not worker_paths and not os.path.lexists(p):
                missing.append(p)
            out.append(os.path.abspath(p))
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise MissingPaths(
            f"{len(missing)} path(s) do not exist: {shown}; check them, or add --worker-paths "
            "if only the workers can see these files"
        )
    return out


def no_images_message(paths: Sequence[str | os.PathLike], recursive: bool) -> str:
    """Why *paths* gave no image, with a hint when a folder holds sub-folders and no ``-r``."""
    msg = f"no images found in {', '.join(map(str, paths))}"
    if recursive:
        return msg
    for p in paths:
        if os.path.isdir(p):
            subs = sorted(str(e.name) for e in os.scandir(os.fspath(p)) if e.is_dir())
            if subs:
                names = ", ".join(subs[:6]) + (", ..." if len(subs) > 6 else "")
                return f"{msg}: {p} has {len(subs)} sub-folders ({names}); add -r to include them"
    return msg


def _chunks(seq: Sequence, n: int) -> Iterable[tuple[int, Sequence]]:
    for i in range(0, len(seq), n):
        yield i, seq[i : i + n]


def send_items(
    job_id: str, items: list[dict], *, queue: str, batch_size: int, producer=None
) -> int:
    """Send *items* (each with its ``pos``) as task messages of *batch_size*; return tasks sent.

    With ``SORTLINE_MAX_QUEUED`` set, each message waits until the queue has room for its
    images (messages are cut to at most that many).
    """
    from worker.app import app

    limit = get_producer_settings().max_queued
    sent = 0
    now = time.time()
    with app.producer_or_acquire(producer) as producer:
        room = _room_check(queue, limit, client=producer.channel.client) if limit else None
        for _, chunk in _chunks(items, max(1, min(batch_size, limit or batch_size))):
            if room is not None:
                room(len(chunk))
            app.send_task(
                TASK,
                args=[build_message(job_id, list(chunk), now)],
                argsrepr=task_summary(job_id, chunk),
                queue=queue,
                producer=producer,
                headers={IMAGES_HEADER: len(chunk)},
                retry=True,
                retry_policy={"max_retries": 10, "interval_start": 0.5, "interval_step": 1},
            )
            sent += 1
    return sent


def _submit(
    items: list[dict],
    *,
    source: str,
    queue: str | None,
    batch_size: int | None,
    when_full: str = "wait",
) -> str:
    s = get_producer_settings()
    queue = queue or s.queue
    batch_size = batch_size or s.batch_size
    if queue not in INFERENCE_QUEUES:
        raise ValueError(f"queue must be cpu or gpu, not {queue!r}")
    if when_full not in WHEN_FULL:
        raise ValueError(f"when_full must be wait or refuse, not {when_full!r}")
    if not items:
        raise NothingToDo("no images to submit")
    if when_full == "refuse":
        refuse_if_full(queue, len(items))
    ensure_schema()
    with session_scope() as session:
        job_id = create_job(session, source=source, queue=queue, total=len(items)).id
        record_items(session, job_id=job_id, items=items)  # what was sent, to re-send it
    try:
        n = send_items(job_id, items, queue=queue, batch_size=batch_size)
    except BaseException:  # the broker is down, or Ctrl-C: never leave it `queued` for ever
        with session_scope() as session:
            end_job(session, job_id=job_id, status="failed")
        raise
    log.info("job %s: %d images in %d tasks on queue %s", job_id, len(items), n, queue)
    return job_id


def submit_paths(
    paths: Iterable[str | os.PathLike],
    *,
    recursive: bool = False,
    pattern: str | None = None,
    queue: str | None = None,
    batch_size: int | None = None,
    when_full: str = "wait",
    worker_paths: bool = False,
) -> str:
    """Submit image files (files, folders, globs) as one job; return the job id.

    Paths that do not exist here are refused unless *worker_paths* (see :func:`expand_paths`).
    A queue holding ``SORTLINE_MAX_QUEUED`` images makes this wait for room, or with
    ``when_full="refuse"`` raise :class:`QueueFull` before anything is created or sent.

    Example:
        >>> job_id = submit_paths(["photos/"], recursive=True)  # doctest: +SKIP
    """
    paths = list(paths)
    files = expand_paths(paths, recursive=recursive, pattern=pattern, worker_paths=worker_paths)
    if not files:
        raise NothingToDo(no_images_message(paths, recursive))
    items = [{"pos": i, "path": f} for i, f in enumerate(files)]
    source = display_ref(", ".join(str(p) for p in paths)[:2000])  # non-UTF-8 names escaped
    return _submit(items, source=source, queue=queue, batch_size=batch_size, when_full=when_full)


def submit_bytes(
    images: Iterable[bytes | tuple[str, bytes]],
    *,
    queue: str | None = None,
    batch_size: int | None = None,
    source: str = "bytes",
    when_full: str = "wait",
) -> str:
    """Submit images given as bytes (or ``(key, bytes)`` pairs); return the job id."""
    items = []
    for i, img in enumerate(images):
        key, data = img if isinstance(img, tuple) else (None, img)
        key = key or "sha256:" + hashlib.sha256(data).hexdigest()
        items.append({"pos": i, "key": key, "data": base64.b64encode(data).decode("ascii")})
    return _submit(items, source=source, queue=queue, batch_size=batch_size, when_full=when_full)


def wait_for_job(
    job_id: str,
    *,
    poll: float = 0.5,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
):
    """Block until every image of the job has a row (or it is cancelled); return the job."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with session_scope() as session:
            job = get_job(session, job_id=job_id)
        if on_progress is not None:
            on_progress(job.finished, job.total)
        if job.status in FINAL or (job.kind != "stream" and job.finished >= job.total):
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout} s")
        time.sleep(poll)
