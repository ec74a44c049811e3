"""Streaming: images arriving one by one join an open job; rows land as they are produced."""

from __future__ import annotations

import subprocess
import sys

import pytest

from db.engine import session_scope
from db.service import get_job, list_results
from producer.stream import StreamJob
from producer.submit import wait_for_job
from tests.support.fixtures import write_images
from tests.support.services import REPO, wait_until

pytestmark = pytest.mark.integration


def test_stream_job_grows_and_finishes_after_close(make_worker, tmp_path):
    make_worker(extra=["-P", "threads", "-c", "4"])
    paths = write_images(tmp_path / "s", 6)
    with StreamJob(source="test") as job:
        for p in paths[:3]:
            job.send(p)
        wait_until(lambda: len(_rows(job.job_id)) == 3, timeout=30)
        with session_scope() as s:
            assert get_job(s, job_id=job.job_id).status == "open"  # not done while open
        for p in paths[3:]:
            job.send(p)
    done = wait_for_job(job.job_id, timeout=30)
    rows = _rows(job.job_id)
    assert (done.status, done.total, done.done) == ("done", 6, 6)
    assert sorted(r.position for r in rows) == list(range(6))
    assert all(r.latency_ms is not None and 0 < r.latency_ms < 30_000 for r in rows)


def test_stream_cli_reads_stdin_and_follow_prints_rows(make_worker, tmp_path):
    make_worker()
    paths = write_images(tmp_path / "s", 4)
    out = subprocess.run(
        [sys.executable, "-m", "sortline.cli", "stream"],
        input="\n".join(map(str, paths)) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[0]
    follow = subprocess.run(
        [sys.executable, "-m", "sortline.cli", "results", "--follow", job_id, "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert follow.returncode == 0, follow.stderr
    assert len(follow.stdout.strip().splitlines()) == 4


def _rows(job_id):
    with session_scope() as s:
        return list(list_results(s, job_id=job_id))
