"""Issue 8 acceptance 3: the worker-cpu and worker-training compose services, run as processes.

Both run their docker-compose.yml command (`sortline worker -Q ...`) with their compose
environment, against one password-protected Redis of this test's own and one PostgreSQL
database, as two containers would. Each serves its own queue; the compose health checks pass;
the CPU worker's Prometheus counters add up its pool processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest
import requests

from db.engine import session_scope
from db.service import list_results
from producer.submit import submit_paths, wait_for_job
from tests.support.fixtures import write_images
from tests.support.own_broker import prometheus_samples
from tests.support.servers import RedisServer, free_port, private_broker
from tests.support.services import REPO, CeleryWorker, wait_until
from tests.unit.test_compose import argv_of, compose
from worker.tasks.ops import PING, PING_KEY

pytestmark = pytest.mark.integration

HOST = socket.gethostname()


@pytest.fixture
def broker(tmp_path, monkeypatch):
    """A Redis with a password, like the compose one, that no other test's worker uses."""
    with private_broker(tmp_path / "redis", monkeypatch, password="test-redis-pw") as server:
        yield server


@pytest.fixture
def stack(broker, pg_url_session, tiny_model, tmp_path, monkeypatch):
    """Start compose services as processes: ``start("worker-cpu", **env)``."""
    monkeypatch.setenv("SORTLINE_DATABASE_URL", pg_url_session)  # the producer's side
    doc = compose(WORKER_CPU_CONCURRENCY="2")
    data = tmp_path / "data"
    data.mkdir()
    started: list[CeleryWorker] = []

    def start(service: str, **env: str) -> CeleryWorker:
        svc = doc["services"][service]
        argv = argv_of(svc["command"])
        assert argv[:2] == ["sortline", "worker"]
        # the container's environment, with this machine's broker, database, model and folder
        env = {
            **{k: str(v) for k, v in svc["environment"].items() if k.startswith("SORTLINE_")},
            "SORTLINE_BROKER_URL": broker.url,
            "SORTLINE_DATABASE_URL": pg_url_session,
            "SORTLINE_MODEL": str(tiny_model),
            "SORTLINE_ALLOWED_ROOTS": str(data),
            "SORTLINE_RUNS_DIR": str(tmp_path / "runs"),
            "SORTLINE_METRICS_DIR": str(tmp_path / f"metrics-{service}"),
            **env,
        }
        queue = argv[argv.index("-Q") + 1]
        w = CeleryWorker(env, name=f"sortline-{queue}", log=tmp_path / f"{service}.log")
        w.argv = [sys.executable, "-m", "sortline.cli", *argv[1:]]
        w.healthcheck = [str(a) for a in svc["healthcheck"]["test"][1:]]
        started.append(w)
        return w.start(timeout=90)

    yield start, data
    for w in started:
        w.stop()


def _health(env: dict[str, str], argv: list[str]) -> subprocess.CompletedProcess:
    assert argv[0] == "sortline"
    return subprocess.run(
        [sys.executable, "-m", "sortline.cli", *argv[1:]],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _ping(broker: RedisServer, queue: str) -> dict:
    from worker.app import app

    token = uuid.uuid4().hex
    app.send_task(PING, args=[token], queue=queue)
    raw = wait_until(lambda: broker.client().get(PING_KEY + token), timeout=60)
    return json.loads(raw)


def test_cpu_and_training_workers_serve_their_queues(stack, broker, tmp_path):
    start, data = stack
    port = free_port()
    cpu = start("worker-cpu", SORTLINE_METRICS_PORT=str(port))
    training_port = free_port()
    training = start("worker-training", SORTLINE_METRICS_PORT=str(training_port))
    assert (cpu.hostname, training.hostname) == (
        f"sortline-cpu@{HOST}",
        f"sortline-training@{HOST}",
    )

    # each consumes exactly its queue (the compose command's -Q)
    from worker.app import app

    queues = app.control.inspect(timeout=2).active_queues()
    assert [q["name"] for q in queues[cpu.hostname]] == ["cpu"]
    assert [q["name"] for q in queues[training.hostname]] == ["training"]

    # the compose health checks pass, and so does a check for both queues
    for w in (cpu, training):
        out = _health(w.env, w.healthcheck)
        assert out.returncode == 0, out.stdout + out.stderr
    both = ["sortline", "health", "-Q", "cpu", "-Q", "training"]
    out = _health(cpu.env, both)
    assert out.returncode == 0, out.stdout + out.stderr

    # a message on each queue is taken by its own worker, which reaches the shared database
    for queue, w in (("training", training), ("cpu", cpu), ("training", training)):
        answer = _ping(broker, queue)
        assert answer["hostname"] == w.hostname
        assert answer["queue"] == queue
        assert answer["database"] == "postgresql"

    # a job on the cpu queue: every row written by the cpu worker
    job_id = submit_paths(write_images(data, 24), batch_size=4, queue="cpu")
    job = wait_for_job(job_id, timeout=120)
    assert (job.done, job.failed) == (24, 0)
    with session_scope() as s:
        rows = list_results(s, job_id=job_id)
    assert {r.worker for r in rows} == {cpu.hostname}

    # the cpu worker's own Prometheus counters, summed over its two pool processes
    def scrape():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        images = prometheus_samples(text, "sortline_images_classified_total{")
        return text if sum(images.values()) == 24 else None

    text = wait_until(scrape, timeout=30)
    images = prometheus_samples(text, "sortline_images_classified_total{")
    assert all('status="ok"' in k for k in images)
    assert prometheus_samples(text, "sortline_batch_size_count")["sortline_batch_size_count"] == 6
    assert prometheus_samples(text, "sortline_batch_size_sum")["sortline_batch_size_sum"] == 24
    assert (
        prometheus_samples(text, "sortline_latency_seconds_count")["sortline_latency_seconds_count"]
        == 24
    )
    # where each image's time went: every stage counted once per image
    stages = prometheus_samples(text, "sortline_stage_seconds_count{")
    assert {k.split('"')[1]: v for k, v in stages.items()} == {
        s: 24 for s in ("queue", "lookup", "decode", "batch_wait", "forward", "write")
    }
    pids = set(os.listdir(tmp_path / "metrics-worker-cpu"))
    assert len(pids) >= 2, pids  # both pool processes recorded (one file each)

    # the training worker has its own exporter, and classified nothing
    text = requests.get(f"http://127.0.0.1:{training_port}/metrics", timeout=5).text
    assert not prometheus_samples(text, "sortline_images_classified_total{")


def test_sortline_up_mirrors_the_compose_stack(tiny_model, tmp_path):
    """`sortline up --training` on a machine without Docker: a Redis with the password of the
    broker URL, the schema migrated, a cpu and a training worker and Flower; the compose
    health check command passes against it, and `sortline down` stops it all."""
    port, flower_port = free_port(), free_port()
    env = {
        **os.environ,
        "SORTLINE_HOME": str(tmp_path / "home"),
        "SORTLINE_BROKER_URL": f"redis://:up-redis-pw@127.0.0.1:{port}/0",
        "SORTLINE_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.db'}",  # not migrated yet
        "SORTLINE_MODEL": str(tiny_model),
        "SORTLINE_FLOWER_PORT": str(flower_port),
        "SORTLINE_FLOWER_USER": "admin",
        "SORTLINE_FLOWER_PASSWORD": "up-flower-pw",
    }

    def sortline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sortline.cli", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    try:
        out = sortline("up", "--training", "-c", "1")
        assert out.returncode == 0, out.stdout + out.stderr
        started = {
            line.split()[1] for line in out.stdout.splitlines() if line.startswith("started")
        }
        assert started == {"redis", "worker", "training", "flower"}
        health = sortline("health", "-Q", "cpu", "-Q", "training", "--node", "sortline-cpu@%h")
        assert health.returncode == 0, health.stdout + health.stderr
        assert "redis://:***@" in health.stdout and "up-redis-pw" not in health.stdout

        def flower_up() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{flower_port}/healthcheck", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_until(flower_up, timeout=30)
        auth = ("admin", "up-flower-pw")
        r = requests.get(f"http://127.0.0.1:{flower_port}/api/workers", timeout=10)
        assert r.status_code == 401
        assert requests.get(r.url, auth=auth, timeout=10).ok
    finally:
        down = sortline("down")
    assert down.returncode == 0, down.stderr
    assert set(down.stdout.removeprefix("stopped ").strip().split(", ")) == started
