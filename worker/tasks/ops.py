"""Diagnostic tasks for operators: which worker serves a queue, and can it reach the database.

``worker.tasks.ops.ping`` has no route of its own: send it to the queue you want to check,
``app.send_task(PING, args=[token], queue="training")``. The worker writes its answer to the
broker under ``sortline:ping:<token>`` for ten minutes (the app keeps no result backend).
"""

from __future__ import annotations

import json
import logging
import time

from sortline.names import PING_TASK
from worker.app import app

log = logging.getLogger(__name__)

PING = PING_TASK
PING_KEY = "sortline:ping:"


def _database() -> str:
    """The database dialect after a ``SELECT 1``, or the reason it failed."""
    from sqlalchemy import text

    from db.engine import get_engine

    try:
        engine = get_engine()
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return engine.dialect.name
    except Exception as e:
        return f"error: {type(e).__name__}"


@app.task(name=PING, bind=True, acks_late=True, time_limit=30, soft_time_limit=20)
def ping(self, token: str) -> dict:
    """Answer with this worker's name, the queue the message came from and the database."""
    from worker.tasks.inference import _broker_redis

    answer = {
        "hostname": self.request.hostname,
        "queue": (self.request.delivery_info or {}).get("routing_key"),
        "database": _database(),
        "at": time.time(),
    }
    client = _broker_redis()
    if client is not None and isinstance(token, str) and 0 < len(token) <= 64:
        client.set(PING_KEY + token, json.dumps(answer), ex=600)
    return answer
