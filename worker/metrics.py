"""sortline's own Prometheus metrics: images classified, errors, batch sizes, latency.

A worker started with ``SORTLINE_METRICS_PORT`` set serves ``/metrics`` on that port from
its main process. Pool processes record into files (prometheus_client's multiprocess mode,
one directory per worker, ``SORTLINE_METRICS_DIR`` or a fresh temporary one) and the main
process adds them up when Prometheus scrapes, so ``-c 8`` still means one port and one
target per worker. Without the port nothing is served and the counters stay in memory.

Celery's own task counts are on Flower's ``/metrics``; these are about images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from celery.signals import task_failure, task_retry, worker_init, worker_ready, worker_shutdown

from db.config import SortlineSettings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# seconds, from 5 ms to 5 min
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class MetricsSettings(SortlineSettings):
    """Where a worker serves its Prometheus metrics."""

    metrics_port: int = 0  # 0: no exporter
    metrics_address: str = "0.0.0.0"
    metrics_dir: str = ""  # multiprocess files; empty: a fresh temporary folder per worker


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.images = Counter(
            "sortline_images_classified",
            "Images given a result row, by status (ok or error) and label.",
            ["status", "label"],
        )
        self.errors = Counter(
            "sortline_errors",
            "Failures: image errors (unreadable, rejected), task retries and failed tasks.",
            ["kind"],
        )
        self.batch = Histogram(
            "sortline_batch_size", "Images classified per task message.", buckets=BATCH_BUCKETS
        )
        self.latency = Histogram(
            "sortline_latency_seconds",
            "From submission to the result row, per image.",
            buckets=LATENCY_BUCKETS,
        )
        self.malformed = Counter(
            "sortline_malformed_messages",
            "Queue entries dropped because they are not task messages the worker can read.",
            ["queue"],
        )
        self.processing = Histogram(
            "sortline_processing_seconds",
            "Read, decode and model time per image in the worker.",
            buckets=LATENCY_BUCKETS,
        )
        self.stage = Histogram(
            "sortline_stage_seconds",
            "Where an image's time goes in the worker, by stage: queue (submitted -> task"
            " start), lookup (the job and its rows so far), decode, batch_wait (handed to the"
            " micro-batcher -> its forward pass starts), forward, write.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
        )


_metrics: tuple[int, _Metrics] | None = None


def metrics() -> _Metrics:
    """This process's metric objects, created on first use (after fork in a pool process)."""
    global _metrics
    if _metrics is None or _metrics[0] != os.getpid():
        _metrics = (os.getpid(), _Metrics())
    return _metrics[1]


def record_rows(rows: list[dict[str, Any]]) -> None:
    """Count the result rows of one task message; never raises."""
    if not rows:
        return
    try:
        m = metrics()
        m.batch.observe(len(rows))
        for r in rows:
            status = r.get("status") or "ok"
            m.images.labels(status=status, label=r.get("label") or "").inc()
            if status != "ok":
                m.errors.labels(kind="image").inc()
            if r.get("latency_ms") is not None:
                m.latency.observe(r["latency_ms"] / 1000)
            if r.get("processing_ms") is not None:
                m.processing.observe(r["processing_ms"] / 1000)
    except Exception:  # metrics must never cost a result
        log.exception("could not record metrics")


def record_stage(stage: str, seconds: float, images: int = 1) -> None:
    """Add *seconds* of *stage* for each of *images* images; never raises."""
    try:
        h = metrics().stage.labels(stage=stage)
        for _ in range(images):
            h.observe(max(0.0, seconds))
    except Exception:  # metrics must never cost a result
        log.exception("could not record metrics")


@task_retry.connect
def _on_retry(**_) -> None:
    metrics().errors.labels(kind="task_retry").inc()


@task_failure.connect
def _on_failure(**_) -> None:
    metrics().errors.labels(kind="task_failure").inc()


def _use_multiprocess_dir(path: Path) -> None:
    """Record into files under *path* from now on, in this process and its forked children."""
    os.environ[MULTIPROC_ENV] = str(path)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # in case prometheus_client came in earlier


_temporary: Path | None = None  # the folder to remove when the worker stops


@worker_init.connect
def _prepare(**_) -> None:
    """In the worker's main process, before the pool forks: the multiprocess folder."""
    s = MetricsSettings()
    if not s.metrics_port:
        return
    global _temporary
    path = Path(s.metrics_dir) if s.metrics_dir else Path(tempfile.mkdtemp(prefix="sortline-m-"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):  # counters start at zero with each worker, as Prometheus expects
        old.unlink()
    _temporary = None if s.metrics_dir else path
    _use_multiprocess_dir(path)


@worker_shutdown.connect
def _cleanup(**_) -> None:
    if _temporary is not None:
        shutil.rmtree(_temporary, ignore_errors=True)


@worker_ready.connect
def _serve(**_) -> None:
    """Serve ``/metrics`` from the worker's main process, summing its pool processes."""
    s = MetricsSettings()
    if not s.metrics_port or MULTIPROC_ENV not in os.environ:
        return
    start_exporter(s.metrics_port, s.metrics_address, Path(os.environ[MULTIPROC_ENV]))


class QueueDepth:
    """``sortline_queue_depth{queue}``: images waiting in the broker, read when scraped."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from sortline.names import INFERENCE_QUEUES
        from worker.queues import queued_images

        g = GaugeMetricFamily(
            "sortline_queue_depth", "Images waiting in the broker queue.", labels=["queue"]
        )
        for q in INFERENCE_QUEUES:
            try:
                g.add_metric([q], queued_images(q))
            except Exception as e:  # a scrape must not fail because the broker is away
                log.warning("queue depth of %s not read: %s", q, e)
        yield g


def start_exporter(port: int, address: str, path: Path):
    """Start an HTTP server in a thread serving the metrics recorded under *path*."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(QueueDepth())
    server, _thread = start_http_server(port, addr=address, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", address, port)
    return server


def record_malformed(queue: str) -> None:
    """Count one queue entry dropped as malformed; never raises."""
    try:
        metrics().malformed.labels(queue=queue).inc()
    except Exception:
        log.exception("could not record metrics")
