"""The Celery app: JSON only, late acks, one prefetch, queues routed by task module.

Start a worker with ``celery -A worker.app worker -Q cpu`` (or ``sortline worker``).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from kombu import Queue

from db.text import escape_log_controls
from sortline.names import CPU_QUEUE, QUEUES, TRAINING_QUEUE
from worker.config import get_worker_settings
from worker.transport import TRANSPORT

log = logging.getLogger(__name__)


def make_app() -> Celery:
    s = get_worker_settings()
    app = Celery(
        "sortline",
        broker=s.broker_url,
        include=["worker.tasks.inference", "worker.tasks.training", "worker.tasks.ops"],
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=s.task_time_limit,
        # the soft limit (error rows) comes 30 s before the hard one (the process is killed),
        # or a fifth of the limit before it when the limit is short
        task_soft_time_limit=max(1, s.task_time_limit - min(30, max(1, s.task_time_limit // 5))),
        broker_transport_options={
            "visibility_timeout": s.visibility_timeout,
            # look for messages of dead workers every few seconds (kombu's default sweep is
            # every 10 s x 10 calls, which would add 100 s to any visibility timeout)
            "unacked_restore_interval": max(1, min(10, s.visibility_timeout // 2)),
            "unacked_restore_throttle": 1,
        },
        # drops queue entries that are not task messages instead of dying on them (plain
        # redis:// URLs; a transport given in the URL, as in redis+socket://, is kombu's own)
        broker_transport=TRANSPORT if s.broker_url.startswith(("redis://", "rediss://")) else None,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue=CPU_QUEUE,
        task_routes={
            "worker.tasks.inference.*": {"queue": CPU_QUEUE},
            "worker.tasks.training.*": {"queue": TRAINING_QUEUE},
        },
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_pool_limit=10,
    )
    return app


app = make_app()


@worker_process_init.connect
def _after_fork(**_) -> None:
    """Each pool process gets its own database engine (never the parent's sockets)."""
    from db.engine import reset_engines

    reset_engines()


@worker_init.connect
def _record_concurrency(sender=None, **_) -> None:
    """Let pool processes know their share of the cores (see ``runtime.torch_threads``)."""
    from worker.runtime import set_worker_concurrency

    conc = getattr(sender, "concurrency", None)
    pool = getattr(sender, "pool_cls", None)
    pool = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in (pool or "prefork"):  # threads/solo: one process owns every core
        conc = 1
    if conc:
        set_worker_concurrency(conc)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _escape_untrusted_text(logger=None, **_) -> None:
    """Log lines show control characters in job ids, file names and errors escaped."""
    escape_log_controls(logger)


_reconciler_stop = threading.Event()


@worker_ready.connect
def _start_reconciler(sender=None, **_) -> None:
    """Every worker looks for stalled jobs now and then (see ``worker.reconcile``)."""
    from worker.reconcile import start_reconciler

    start_reconciler(worker=getattr(sender, "hostname", None), stop=_reconciler_stop)


@worker_shutdown.connect
def _stop_reconciler(**_) -> None:
    _reconciler_stop.set()
