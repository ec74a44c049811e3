"""Issue 2 acceptance: producer -> Redis -> real Celery worker -> SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.models import Result
from db.service import get_job, label_counts, list_results
from producer.submit import send_items, submit_bytes, submit_paths, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import CLASSES, jpeg_bytes, write_images
from tests.support.services import wait_until
from worker.app import app

pytestmark = pytest.mark.integration


def _rows(job_id: str) -> list[Result]:
    with session_scope() as s:
        return list(list_results(s, job_id=job_id))


def test_500_images_one_row_each(make_worker, tmp_path):
    make_worker(concurrency=2)
    write_images(tmp_path / "photos", 500)
    job_id = submit_paths([tmp_path / "photos"], batch_size=16)
    job = wait_for_job(job_id, timeout=240)

    rows = _rows(job_id)
    assert len(rows) == 500
    assert sorted(r.position for r in rows) == list(range(500))
    assert job.status == "done" and job.done == 500 and job.failed == 0 and job.total == 500
    assert all(r.status == "ok" and r.label in CLASSES for r in rows)
    assert all(abs(sum(r.probs.values()) - 1) < 1e-3 for r in rows)
    assert job.model_version == "tiny-test:0"

    # queryable by label and confidence, through the service layer and the CLI
    with session_scope() as s:
        counts = label_counts(s, job_id=job_id)
        assert sum(counts.values()) == 500
        label, n = next(iter(counts.items()))
        assert len(list_results(s, job_id=job_id, label=label)) == n
        confs = sorted(r.confidence for r in rows)
        mid = confs[250]
        high = list_results(s, job_id=job_id, min_confidence=mid)
        assert len(high) == sum(c >= mid for c in confs) and all(r.confidence >= mid for r in high)
    out = CliRunner().invoke(cli, ["results", job_id[:8], "--label", label, "--format", "json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.output.splitlines()]
    assert len(lines) == n and {d["label"] for d in lines} == {label}


def test_redelivered_message_leaves_one_row_per_image(make_worker, tmp_path):
    paths = write_images(tmp_path / "p", 12)
    job_id = submit_paths(paths, batch_size=6)
    items = [{"pos": i, "path": str(p)} for i, p in enumerate(paths)]
    send_items(job_id, items, queue="cpu", batch_size=6)  # the same two messages again
    send_items(job_id, items[:6], queue="cpu", batch_size=6)
    make_worker(concurrency=2)
    wait_for_job(job_id, timeout=60)
    # let the duplicates drain, then check nothing was added
    with app.connection() as conn:
        wait_until(lambda: conn.default_channel.client.llen("cpu") == 0, timeout=30)
    time.sleep(1.0)
    rows = _rows(job_id)
    assert sorted(r.position for r in rows) == list(range(12))
    with session_scope() as s:
        job = get_job(s, job_id=job_id)
    assert (job.done, job.failed, job.total) == (12, 0, 12)


def test_corrupt_and_missing_become_error_rows(make_worker, tmp_path):
    good = write_images(tmp_path / "p", 6)
    corrupt = tmp_path / "p" / "corrupt.jpg"
    corrupt.write_bytes(jpeg_bytes(99)[:200])  # truncated JPEG
    missing = tmp_path / "p" / "not-there.jpg"
    make_worker()
    job_id = submit_paths([*good[:3], corrupt, missing, *good[3:]], batch_size=4, worker_paths=True)
    job = wait_for_job(job_id, timeout=60)
    rows = {r.ref: r for r in _rows(job_id)}
    assert (job.done, job.failed) == (6, 2)
    assert rows[str(corrupt)].status == "error" and "truncated" in rows[str(corrupt)].error
    assert rows[str(missing)].status == "error" and "not found" in rows[str(missing)].error
    assert all(rows[str(p)].status == "ok" and rows[str(p)].label for p in good)


def test_submit_bytes(make_worker):
    make_worker()
    job_id = submit_bytes([jpeg_bytes(i) for i in range(5)] + [b"not an image"], batch_size=4)
    job = wait_for_job(job_id, timeout=60)
    rows = _rows(job_id)
    assert (job.done, job.failed) == (5, 1)
    assert all(r.ref.startswith("sha256:") for r in rows)
    assert rows[-1].status == "error" and "not an image" in rows[-1].error


def test_cli_submit_wait_prints_summary(make_worker, tmp_path):
    make_worker()
    write_images(tmp_path / "a" / "b", 3)
    write_images(tmp_path / "a", 2, prefix="top")
    out = CliRunner().invoke(cli, ["submit", str(tmp_path / "a"), "-r", "--wait", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.strip().splitlines()[-1])
    assert summary["total"] == 5 and summary["done"] == 5 and sum(summary["labels"].values()) == 5
