"""Inference tasks (queues ``cpu`` and ``gpu``): classify a batch of image references."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from sortline.names import CLASSIFY_TASK
from worker.app import app
from worker.classify import Written, classify_message, record_error_rows
from worker.config import get_worker_settings
from worker.inputs import MessageError, parse_message, salvage

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, OSError)
DELIVERIES_KEY = "sortline:deliveries:"

_redis: tuple[int, redis.Redis | None] | None = None


def _broker_redis() -> redis.Redis | None:
    """A Redis client on the broker (this process's own), or None for another broker."""
    global _redis
    if _redis is not None and _redis[0] == os.getpid():
        return _redis[1]
    url = get_worker_settings().broker_url
    opts: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 5}
    client = None
    if url.startswith("redis+socket://"):
        client = redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"), **opts)
    elif url.startswith(("redis://", "rediss://", "unix://")):
        client = redis.from_url(url, **opts)
    _redis = (os.getpid(), client)
    return client


def database_unavailable(e: BaseException) -> bool:
    """Whether *e* is the database failing (down, silent, read-only, out of connections …)
    rather than refusing the data itself: such a message is kept for as long as it takes."""
    return isinstance(e, DBAPIError) and not isinstance(e, DataError | IntegrityError)


def _keep(task, msg_job: str, e: BaseException):
    """Retry later, without end: nothing about the images is known yet."""
    delay = min(60, 2 ** min(task.request.retries, 6))
    log.warning("job %s: database unavailable (%s); retry in %ss", msg_job, _first_line(e), delay)
    return task.retry(exc=e, countdown=delay, max_retries=None)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def count_delivery(task_id: str | None) -> int | None:
    """How many times this task has started (retries included), or None if unknown.

    A message that kills its worker process (segfault, out of memory) is requeued by
    ``task_reject_on_worker_lost`` and would otherwise come back for ever.
    """
    client = _broker_redis()
    if client is None or not task_id:
        return None
    try:
        pipe = client.pipeline()
        pipe.incr(DELIVERIES_KEY + task_id)
        pipe.expire(DELIVERIES_KEY + task_id, 86_400)
        return int(pipe.execute()[0])
    except redis.RedisError as e:
        log.warning("cannot count deliveries of task %s: %s", task_id, e)
        return None


def forget_deliveries(task_id: str | None) -> None:
    client = _broker_redis()
    if client is not None and task_id:
        with contextlib.suppress(redis.RedisError):  # it expires anyway
            client.delete(DELIVERIES_KEY + task_id)


@app.task(
    name=CLASSIFY_TASK,
    bind=True,
    acks_late=True,
    acks_on_timeout=False,  # over the hard time limit: requeued, and counted as a crash below
    max_retries=None,  # bounded below by SORTLINE_TASK_MAX_RETRIES
)
def classify_batch(self, message: dict) -> dict:
    """Classify the images of one message and write one row per image (idempotent)."""
    worker = self.request.hostname
    task_id = self.request.id
    try:
        msg = parse_message(message)
    except MessageError as e:
        return _reject(self, message, str(e), worker=worker)
    limit = get_worker_settings().task_max_retries
    deliveries = count_delivery(task_id)
    # starts that ended neither in a retry nor in a result: the worker process died
    crashes = 0 if deliveries is None else deliveries - 1 - self.request.retries
    if crashes > limit:
        reason = (
            f"gave up: the worker process died {crashes} times while running this task "
            "(crash, out of memory, killed, or over the hard time limit "
            f"SORTLINE_TASK_TIME_LIMIT); SORTLINE_TASK_MAX_RETRIES={limit}"
        )
        return _give_up(self, msg, reason, worker=worker)
    try:
        written = classify_message(msg, worker=worker)
    except MessageError as e:
        log.error("rejected message for job %s: %s", msg.job_id, e)
        forget_deliveries(task_id)
        return Written(0, note=f"rejected: {e}").as_result()
    except DBAPIError as e:
        if database_unavailable(e):
            raise _keep(self, msg.job_id, e) from None
        reason = f"the database refused the rows: {_first_line(e)}"
    except TRANSIENT as e:
        if self.request.retries < limit:
            delay = min(60, 2**self.request.retries)
            log.warning("job %s: transient error (%s); retry in %ss", msg.job_id, e, delay)
            raise self.retry(exc=e, countdown=delay) from None
        reason = f"gave up after {limit} retries: {type(e).__name__}: {e}"
    except SoftTimeLimitExceeded as e:  # a paused or starved worker as much as a slow message
        if self.request.retries < limit:
            log.warning("job %s: over the soft time limit; retrying", msg.job_id)
            raise self.retry(exc=e, countdown=1) from None
        reason = (
            f"task time limit exceeded {limit + 1} times (SORTLINE_TASK_TIME_LIMIT); "
            f"SORTLINE_TASK_MAX_RETRIES={limit}"
        )
    except Exception as e:  # a poison message: bounded retries, then error rows
        if self.request.retries < limit:
            log.exception("job %s: unexpected error; retrying", msg.job_id)
            raise self.retry(exc=e, countdown=min(60, 2**self.request.retries)) from None
        reason = f"failed after {limit} retries: {type(e).__name__}: {e}"
    else:
        forget_deliveries(task_id)
        return written.as_result()
    return _give_up(self, msg, reason, worker=worker)


def _give_up(task, msg, reason: str, *, worker: str | None) -> dict:
    """Record *reason* as the error row of every image of *msg* that has none yet."""
    log.error("job %s: recording %d error rows: %s", msg.job_id, len(msg.items), reason)
    try:
        n = record_error_rows(msg.job_id, msg.items, reason, worker=worker)
    except DBAPIError as e:
        # Nothing can be recorded while the database is unavailable: keep the message, for
        # as long as it takes (the images may well be fine once it is back).
        if database_unavailable(e):
            raise _keep(task, msg.job_id, e) from None
        log.error("job %s: cannot record error rows: %s", msg.job_id, _first_line(e))
        n = 0
    forget_deliveries(task.request.id)
    return Written(n, n, note=reason[:200]).as_result()


def _reject(task, message, reason: str, *, worker: str | None) -> dict:
    """A message that cannot be parsed: error rows for the images it names, if any."""
    found = salvage(message)
    if found is None:
        log.error("rejected message (no job and positions to record it under): %s", reason)
        return Written(0, note=f"rejected: {reason[:200]}").as_result()
    job_id, items = found
    log.error("rejected message for job %s: %s", job_id[:64], reason)
    try:
        n = record_error_rows(job_id, items, f"rejected message: {reason}", worker=worker)
    except DBAPIError as e:
        if database_unavailable(e):
            raise _keep(task, job_id, e) from None
        log.error("cannot record the rejected message: %s", _first_line(e))
        return Written(0, note=f"rejected: {reason[:200]}").as_result()
    return Written(n, n, note=f"rejected: {reason[:200]}").as_result()
