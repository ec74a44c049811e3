"""Backpressure: a stream faster than its worker waits for room; the queue never passes the limit."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from db.config import clear_settings
from db.engine import session_scope
from db.service import list_results
from producer.stream import StreamJob
from producer.submit import QueueFull, send_items, submit_paths, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import write_images
from worker.queues import queued_images

pytestmark = pytest.mark.integration

LIMIT = 5


@pytest.fixture
def limit(monkeypatch, request):
    monkeypatch.setenv("SORTLINE_MAX_QUEUED", str(LIMIT))
    clear_settings()
    request.addfinalizer(clear_settings)
    return LIMIT


def test_queued_images_counts_the_images_of_each_message(db_url, limit, tmp_path):
    from worker.app import app

    paths = [str(p) for p in write_images(tmp_path / "q", 5)]
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete("cpu")
    send_items(
        "no-job", [{"pos": i, "path": p} for i, p in enumerate(paths)], queue="cpu", batch_size=2
    )  # fmt: skip  (no worker: the messages stay queued)
    assert queued_images("cpu") == 5  # messages of 2, 2 and 1 images
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete("cpu")


def test_stream_faster_than_a_slow_worker_stays_under_the_limit(make_worker, limit, tmp_path):
    make_worker(app="tests.support.faulty_app", env={"SORTLINE_TEST_DELAY_S": "0.15"})
    paths = write_images(tmp_path / "s", 30)
    depths: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            depths.append(queued_images("cpu"))
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with StreamJob(source="test") as job:
            for p in paths:  # as fast as the producer can: far faster than 0.15 s per image
                job.send(p)
    finally:
        done.set()
        watcher.join()
    finished = wait_for_job(job.job_id, timeout=120)
    with session_scope() as s:
        rows = list_results(s, job_id=job.job_id)
    assert max(depths) <= LIMIT and max(depths) >= LIMIT - 1  # filled up to the limit, never past
    assert sorted(r.position for r in rows) == list(range(30))  # exactly one row per image
    assert (finished.status, finished.done) == ("done", 30)


def test_submit_refuses_a_job_with_no_room(db_url, limit, tmp_path):
    from worker.app import app

    paths = write_images(tmp_path / "r", 4)
    job = submit_paths(paths, batch_size=1)  # no worker: four images wait on the queue
    with pytest.raises(QueueFull, match="queue cpu holds 4 images and SORTLINE_MAX_QUEUED is 5"):
        submit_paths(paths, when_full="refuse")
    r = CliRunner().invoke(cli, ["submit", *map(str, paths), "--when-full", "refuse"])
    assert r.exit_code == 1 and "no room for 4 more" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["status", job])
    assert "queue cpu: 4 images waiting of at most 5" in r.output
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete("cpu")
