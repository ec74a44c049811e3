"""Inference tasks (queues ``cpu`` and ``gpu``): classify a batch of image references."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from db.engine import session_scope
from db.service import record_results
from worker.app import app
from worker.classify import classify_message, error_row
from worker.config import get_worker_settings
from worker.inputs import MessageError, parse_message

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError, OSError)


@app.task(
    name="worker.tasks.inference.classify_batch",
    bind=True,
    acks_late=True,
    max_retries=None,  # bounded below by SORTLINE_TASK_MAX_RETRIES
)
def classify_batch(self, message: dict) -> int:
    """Classify the images of one message and write one row per image (idempotent)."""
    try:
        msg = parse_message(message)
    except MessageError as e:
        log.error("rejected message: %s", e)
        return 0
    worker = self.request.hostname
    limit = get_worker_settings().task_max_retries
    try:
        return classify_message(msg, worker=worker)
    except MessageError as e:
        log.error("rejected message for job %s: %s", msg.job_id, e)
        return 0
    except TRANSIENT as e:
        if self.request.retries < limit:
            delay = min(60, 2**self.request.retries)
            log.warning("job %s: transient error (%s); retry in %ss", msg.job_id, e, delay)
            raise self.retry(exc=e, countdown=delay) from None
        reason = f"gave up after {limit} retries: {type(e).__name__}: {e}"
    except SoftTimeLimitExceeded:
        reason = "task time limit exceeded (SORTLINE_TASK_TIME_LIMIT)"
    except Exception as e:  # a poison message: bounded retries, then error rows
        if self.request.retries < limit:
            log.exception("job %s: unexpected error; retrying", msg.job_id)
            raise self.retry(exc=e, countdown=min(60, 2**self.request.retries)) from None
        reason = f"failed after {limit} retries: {type(e).__name__}: {e}"
    log.error("job %s: recording %d error rows: %s", msg.job_id, len(msg.items), reason)
    with session_scope() as session:
        return record_results(
            session,
            job_id=msg.job_id,
            rows=[error_row(it, reason, worker=worker) for it in msg.items],
        )
