"""Stopping jobs: cancel one (its queued messages dropped, its tasks revoked), close a stream."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

from db.engine import session_scope
from db.service import FINAL, close_job, end_job, get_job
from sortline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Cancelled:
    job_id: str
    dropped: int  # messages taken off the queue before any worker saw them
    revoked: int  # task ids revoked (queued ones and those a worker holds)
    rows: int  # rows already written, which stay


def _job_of(raw: bytes | str) -> tuple[str | None, str | None]:
    """(job id, task id) of one kombu Redis message, or (None, None) if it is not a task."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return args[0]["job_id"], envelope["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, None


def drop_queued(job_id: str, queue: str) -> tuple[int, list[str]]:
    """Remove the job's messages still waiting in *queue*; return (dropped, their task ids and
    those of the job's messages a worker has taken but not acknowledged)."""
    from worker.app import app

    dropped, task_ids = 0, []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        for key in {channel._q_for_pri(queue, p) for p in channel.priority_steps}:
            for raw in client.lrange(key, 0, -1):
                job, task_id = _job_of(raw)
                if job == job_id and task_id:
                    dropped += client.lrem(key, 0, raw)
                    task_ids.append(task_id)
        for raw in client.hvals(channel.unacked_key):
            try:
                job, task_id = _job_of(json.dumps(json.loads(raw)[0]))
            except (ValueError, IndexError, TypeError):
                continue
            if job == job_id and task_id:
                task_ids.append(task_id)
    return dropped, task_ids


def cancel_job(job: str) -> Cancelled:
    """Cancel a job: mark it cancelled, drop its queued messages and revoke its tasks."""
    from worker.app import app

    with session_scope() as session:
        j = get_job(session, job_id=job)
        if j.status in FINAL:
            raise ConfigError(f"job {j.id} is already {j.status}; nothing to cancel")
        end_job(session, job_id=j.id, status="cancelled")
        job_id, queue, rows = j.id, j.queue, j.finished
    # marked first: a worker that takes one of its messages from now on skips it
    dropped, task_ids = drop_queued(job_id, queue)
    if task_ids:
        app.control.revoke(task_ids)
    log.info(
        "job %s cancelled: %d messages dropped, %d tasks revoked", job_id, dropped, len(task_ids)
    )
    return Cancelled(job_id, dropped, len(task_ids), rows)


def close_stream(job: str) -> str:
    """Close a streaming job left open (its producer died); return the job id."""
    with session_scope() as session:
        j = get_job(session, job_id=job)
        if j.kind != "stream":
            raise ConfigError(f"job {j.id} is not a streaming job; only streams are closed")
        if j.status != "open":
            raise ConfigError(f"job {j.id} is already closed ({j.status})")
        close_job(session, job_id=j.id)
        return j.id
