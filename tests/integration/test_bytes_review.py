"""Issue 15 item 5: photos sent as bytes are kept (SORTLINE_BYTES_DIR) and can be reviewed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from db.config import clear_settings
from producer.submit import submit_bytes, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import jpeg_bytes

pytestmark = pytest.mark.integration


def test_review_export_copies_bytes_the_workers_kept(make_worker, tmp_path, monkeypatch):
    kept = tmp_path / "bytes"
    make_worker(env={"SORTLINE_BYTES_DIR": str(kept), "SORTLINE_REVIEW_THRESHOLD": "1.01"})
    photos = [jpeg_bytes(i) for i in range(3)]
    job_id = submit_bytes(photos)
    wait_for_job(job_id, timeout=60)

    r = CliRunner().invoke(cli, ["review", "export", job_id, "--out", str(tmp_path / "none")])
    assert r.exit_code == 0 and "exported 0 images" in r.output  # this process: not set
    assert r.output.count("sent as bytes and not kept (set SORTLINE_BYTES_DIR") == 3

    monkeypatch.setenv("SORTLINE_BYTES_DIR", str(kept))
    clear_settings()
    exp = tmp_path / "review"
    r = CliRunner().invoke(cli, ["review", "export", job_id, "--out", str(exp)])
    assert r.exit_code == 0 and "exported 3 images" in r.output, r.output
    for it in json.loads((exp / "review.json").read_text())["items"]:
        assert (exp / it["label"] / it["file"]).read_bytes() == photos[it["position"]]
