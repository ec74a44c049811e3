"""Flower started by `sortline flower` lists the worker and its finished tasks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import requests

from producer.submit import submit_paths, wait_for_job
from tests.support.fixtures import write_images
from tests.support.services import REPO, wait_until

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower(tmp_path):
    port = _free_port()
    env = {**os.environ, "SORTLINE_FLOWER_USER": "admin", "SORTLINE_FLOWER_PASSWORD": "s3cret"}
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "sortline.cli", "flower", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{base}/healthcheck", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_until(up, timeout=60)
    yield base
    proc.terminate()
    proc.wait(10)


def test_flower_lists_worker_and_finished_tasks(flower, make_worker, tmp_path):
    auth = ("admin", "s3cret")
    assert requests.get(f"{flower}/api/workers", timeout=5).status_code == 401
    w = make_worker()
    job_id = submit_paths(write_images(tmp_path / "p", 8), batch_size=4)
    wait_for_job(job_id, timeout=60)

    workers = wait_until(
        lambda: (
            (r := requests.get(f"{flower}/api/workers?refresh=1", auth=auth, timeout=10)).ok
            and w.hostname in r.json()
            and r.json()
        ),
        timeout=30,
    )
    assert w.hostname in workers

    def finished():
        tasks = requests.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        done = {
            uuid: t
            for uuid, t in tasks.items()
            if t["name"] == "worker.tasks.inference.classify_batch"
            and t["state"] == "SUCCESS"
            and (t.get("args") or "").startswith(f"job {job_id[:8]}: ")
        }
        return len(done) >= 2 and done

    done = wait_until(finished, timeout=30)
    assert len(done) == 2
    # the task list shows what each task is and what it did, not a raw dict and a bare count
    shown = sorted((t["args"], t["result"]) for t in done.values())
    assert shown == [
        (
            f"job {job_id[:8]}: 4 images (img0000{a}.jpg, img0000{a + 1}.jpg, img0000{a + 2}.jpg, ...)",
            "{'rows': 4, 'errors': 0}",
        )
        for a in (0, 4)
    ]
    uuid = next(iter(done))
    page = requests.get(f"{flower}/task/{uuid}", auth=auth, timeout=5)
    assert page.ok and f"job {job_id[:8]}: 4 images" in page.text
    assert "rows" in page.text and "errors" in page.text
