"""Everyday mistakes get one clear line (issue 18): no worker, missing paths, Ctrl-C, typos."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.service import create_job, get_job
from sortline.cli import cli
from tests.support.fixtures import CLASSES, write_images
from tests.support.services import REPO

pytestmark = pytest.mark.integration


def sortline(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sortline.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        **kw,
    )


def _job(job_id: str):
    with session_scope() as s:
        return get_job(s, job_id=job_id)


def _queued(queue: str = "cpu") -> int:
    import redis

    from worker.config import get_worker_settings

    return redis.from_url(get_worker_settings().broker_url).llen(queue)


def test_wait_without_a_worker_names_the_queue_then_cancel_drops_its_messages(db_url, tmp_path):
    write_images(tmp_path / "p", 6)
    before = _queued()
    out = sortline("submit", str(tmp_path / "p"), "--batch-size", "2", "--wait", "--timeout", "8")
    assert out.returncode == 1
    job_id = out.stdout.split()[0]
    assert "no worker consumes queue cpu: start one with `sortline worker --queues cpu`" in (
        out.stderr
    )
    assert f"job {job_id} not finished after 8 s; the job goes on" in out.stderr
    assert "Traceback" not in out.stderr
    assert _queued() == before + 3

    cancelled = sortline("cancel", job_id[:8])
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {job_id} cancelled: 3 queued messages dropped" in cancelled.stdout
    assert _queued() == before
    job = _job(job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    again = sortline("cancel", job_id)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def test_missing_local_path_is_refused_unless_worker_paths(make_worker, tmp_path):
    gone = tmp_path / "gone.jpg"
    out = CliRunner().invoke(cli, ["submit", str(gone)])
    assert out.exit_code == 1
    assert f"1 path(s) do not exist: {gone}" in out.output and "--worker-paths" in out.output
    make_worker()
    out = sortline("submit", str(gone), "--worker-paths", "--wait")
    job_id = out.stdout.split()[0]
    assert out.returncode == 1, out.stderr  # nothing labelled: not a success
    assert f"no image of job {job_id[:8]} was labelled (1 errors)" in out.stderr
    assert (_job(job_id).done, _job(job_id).failed) == (0, 1)


def test_ctrl_c_while_waiting_says_the_job_goes_on(db_url, tmp_path):
    write_images(tmp_path / "p", 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sortline.cli", "submit", str(tmp_path / "p"), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    job_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Aborted!" not in err
    assert f"stopped waiting; the job goes on: `sortline status {job_id[:8]}`" in err
    assert f"`sortline cancel {job_id[:8]}` stops it" in err
    assert sortline("cancel", job_id).returncode == 0  # leave no message for later tests


def test_a_job_whose_messages_never_reach_the_broker_is_failed(db_url, tmp_path, monkeypatch):
    from kombu.exceptions import OperationalError

    def broker_down(*a, **kw):
        raise OperationalError("Error 111 connecting to localhost:6399. Connection refused.")

    monkeypatch.setattr("producer.submit.send_items", broker_down)
    write_images(tmp_path / "p", 2)
    out = CliRunner().invoke(cli, ["submit", str(tmp_path / "p")])
    assert out.exit_code == 1 and "cannot reach the broker" in out.output
    assert _job("latest").status == "failed"


def test_stream_closes_its_job_on_sigterm_and_close_closes_one_left_open(db_url):
    proc = subprocess.Popen(
        [sys.executable, "-m", "sortline.cli", "stream"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    job_id = proc.stdout.readline().strip()
    assert _job(job_id).status == "open"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"closed job {job_id} after 0 images" in err
    assert _job(job_id).status == "done"

    with session_scope() as s:  # a stream whose producer died
        left = create_job(s, source="test", queue="cpu", total=0, kind="stream").id
    out = CliRunner().invoke(cli, ["close", left])
    assert out.exit_code == 0 and f"closed job {left}" in out.output
    assert _job(left).status == "done"
    out = CliRunner().invoke(cli, ["close", left])
    assert out.exit_code == 1 and "already closed (done)" in out.output


def test_results_and_status_read_well(make_worker, tmp_path):
    """Labels checked against the model's classes, review marks, p_<class> CSV, status figures."""
    make_worker(env={"SORTLINE_REVIEW_THRESHOLD": "1.01"})  # every labelled image needs review
    write_images(tmp_path / "p", 5)
    out = sortline("submit", str(tmp_path / "p"), "--wait")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[0]
    assert "img/s" in out.stderr and "ETA" in out.stderr  # the progress bar's rate and ETA
    status = CliRunner().invoke(cli, ["status", job_id])
    assert "5 labelled, 0 errors, 5 need review" in status.output
    assert "model tiny-test:0; 5/5 images in" in status.output and "images/s)" in status.output

    bad = CliRunner().invoke(cli, ["results", job_id, "--label", "glas"])
    assert bad.exit_code == 2
    assert "'glas' is not a class of this job's model; did you mean 'glass'?" in bad.output

    table = CliRunner().invoke(cli, ["results", job_id, "--needs-review"]).output.splitlines()
    assert table[0].split()[:4] == ["pos", "label", "conf", "note"]
    assert len(table) == 6 and all("needs review" in line for line in table[1:])

    rows = list(
        csv.DictReader(
            io.StringIO(CliRunner().invoke(cli, ["results", job_id, "--format", "csv"]).output)
        )
    )  # noqa: E501
    assert len(rows) == 5 and "probs" not in rows[0]
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(p) - 1) < 1e-3 and max(p) == pytest.approx(float(r["confidence"]), abs=1e-6)

    jobs = CliRunner().invoke(cli, ["jobs"]).output.splitlines()
    assert jobs[0].split()[:4] == ["job", "status", "finished", "queue"]
    assert jobs[1].startswith(job_id)


def test_results_json_has_the_shape_of_predict_json(make_worker, tiny_model, tmp_path):
    make_worker()
    photo = write_images(tmp_path / "p", 1)[0]
    out = sortline("submit", str(photo), "--wait")
    assert out.returncode == 0, out.stderr
    from_job = json.loads(CliRunner().invoke(cli, ["results", "latest", "--format", "json"]).output)
    pred = sortline("predict", str(photo), "--checkpoint", str(tiny_model), "--json")
    assert pred.returncode == 0, pred.stderr
    in_process = json.loads(pred.stdout)
    # the shared image record first; predict adds how it ran in process (runtime, precision)
    shared = [k for k in in_process if k not in ("runtime", "precision")]
    assert shared == list(from_job)[: len(shared)]
    assert (in_process["ref"], in_process["label"]) == (from_job["ref"], from_job["label"])
    assert in_process["probabilities"] == pytest.approx(from_job["probabilities"], abs=1e-4)
