"""Reconciling jobs whose messages were lost between the producer and the workers.

Redis restarted without persistence, a queue deleted by hand, a message dropped on the way:
the job row knows how many images it has and ``job_items`` what was sent for each position.
A job without a new row for ``SORTLINE_RECONCILE_AFTER`` seconds is *stalled*; reconciling it
re-sends its missing positions (rows are unique per position, so a message that was only
slow costs a no-op) and, once ``SORTLINE_RECONCILE_MAX_RESENDS`` re-sends brought nothing, or
where nothing can be re-sent (submitted bytes are not kept), records error rows saying why.
Nothing is re-sent while the job's queue still holds messages or workers hold some of them:
a quiet job may only be waiting its turn. Every worker runs :func:`reconcile_stalled` now and
then; a job is claimed by one worker at a time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from sqlalchemy import select

from db.config import get_db_settings
from db.engine import session_scope
from db.models import Job
from db.service import claim_stalled, missing_items, stalled_jobs
from worker.classify import record_error_rows
from worker.inputs import Item, build_message, display_ref, task_summary

log = logging.getLogger(__name__)

TASK = "worker.tasks.inference.classify_batch"
RESEND_BATCH = 16
LOST = "message lost between producer and worker"


def queue_busy(queue: str) -> bool:
    """Whether *queue* still holds messages, or workers hold some of it unacknowledged: then
    a quiet job may only be waiting, and nothing is re-sent yet."""
    from worker.tasks.inference import _broker_redis

    client = _broker_redis()
    if client is None:  # another broker: nothing to look at, so assume all was lost
        return False
    if client.llen(queue):
        return True
    for raw in client.hvals("unacked"):  # kombu's: [message, exchange, routing key] each
        try:
            if json.loads(raw)[2] == queue:
                return True
        except (ValueError, LookupError, TypeError):
            continue
    return False


def reconcile_job(job_id: str, *, worker: str | None = None) -> int:
    """Reconcile one stalled job (if no one else does now); return positions handled."""
    s = get_db_settings()
    with session_scope() as session:
        queue = session.scalar(select(Job.queue).where(Job.id == job_id))
    if queue is None or queue_busy(queue):
        return 0
    with session_scope() as session:
        job = claim_stalled(session, job_id=job_id, quiet_for=s.reconcile_after)
        if job is None:
            return 0
        missing = missing_items(session, job=job)
        queue, attempt = job.queue, job.resends
    if not missing:
        return 0
    paths = {p: os.fsdecode(raw) for p, raw in missing.items() if raw is not None}
    no_path = [p for p in missing if p not in paths]
    fail: dict[str, list[int]] = {}
    if no_path:
        fail[f"{LOST}; submitted bytes are not kept, so it cannot be re-sent: submit again"] = (
            no_path
        )
    if paths and attempt > s.reconcile_max_resends:
        fail[
            f"{LOST}: no row after {attempt - 1} re-sends (SORTLINE_RECONCILE_MAX_RESENDS="
            f"{s.reconcile_max_resends})"
        ] = list(paths)
    elif paths:
        try:
            _resend(job_id, paths, queue=queue)
            log.warning(
                "job %s: no new row for %gs; re-sent %d missing positions (attempt %d)",
                job_id,
                s.reconcile_after,
                len(paths),
                attempt,
            )
        except Exception as e:  # the broker: try again next round, error rows at the last
            log.error("job %s: re-sending %d positions failed: %s", job_id, len(paths), e)
            if attempt >= s.reconcile_max_resends:
                fail[f"{LOST}; re-sending failed: {type(e).__name__}: {e}"] = list(paths)
    for reason, positions in fail.items():
        items = [Item(pos=p, ref=_ref(paths.get(p), p)) for p in positions]
        n = record_error_rows(job_id, items, reason, worker=worker)
        log.error("job %s: %d error rows: %s", job_id, n, reason)
    return len(missing)


def _ref(path: str | None, pos: int) -> str:
    return display_ref(path) if path is not None else f"pos:{pos}"


def _resend(job_id: str, paths: dict[int, str], *, queue: str) -> None:
    from worker.app import app

    items = [{"pos": p, "path": path} for p, path in sorted(paths.items())]
    now = time.time()
    with app.producer_or_acquire() as producer:
        for i in range(0, len(items), RESEND_BATCH):
            chunk = items[i : i + RESEND_BATCH]
            app.send_task(
                TASK,
                args=[build_message(job_id, chunk, now)],
                argsrepr=task_summary(job_id, chunk),
                queue=queue,
                producer=producer,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1},
            )


def reconcile_stalled(*, worker: str | None = None) -> int:
    """Reconcile every stalled job; return how many positions were handled."""
    after = get_db_settings().reconcile_after
    with session_scope() as session:
        ids = stalled_jobs(session, quiet_for=after)
    return sum(reconcile_job(j, worker=worker) for j in ids)


def start_reconciler(*, worker: str | None, stop: threading.Event) -> threading.Thread:
    """A daemon thread that reconciles stalled jobs every so often until *stop* is set."""
    every = max(1.0, min(get_db_settings().reconcile_after / 2, 30.0))

    def run() -> None:
        while not stop.wait(every):
            try:
                reconcile_stalled(worker=worker)
            except Exception as e:  # the database or broker down: the next round tries again
                log.warning("reconciling stalled jobs failed: %s", e)

    thread = threading.Thread(target=run, name="sortline-reconciler", daemon=True)
    thread.start()
    return thread
