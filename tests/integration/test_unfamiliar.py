"""Issue 15 item 1: workers store each image's unfamiliarity and flag unfamiliar ones."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.service import list_results
from producer.submit import submit_bytes, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import jpeg_bytes, tiny_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scored_model(tmp_path_factory):
    return tiny_checkpoint(
        tmp_path_factory.mktemp("m") / "scored.safetensors", seed=5, unfamiliarity=True
    )


def test_unfamiliar_images_need_review_whatever_their_confidence(make_worker, scored_model):
    from training.model.checkpoint import read_metadata

    thr = read_metadata(scored_model)["unfamiliarity"]["threshold"]
    make_worker(env={"SORTLINE_MODEL": str(scored_model), "SORTLINE_REVIEW_THRESHOLD": "0"})
    # generated images beyond those the statistics were fitted on, and far-off ones
    photos = [jpeg_bytes(i) for i in range(200, 216)] + [jpeg_bytes(i, (400, 30)) for i in range(8)]
    job_id = submit_bytes(photos, batch_size=8)
    assert wait_for_job(job_id, timeout=90).done == len(photos)
    with session_scope() as s:
        rows = list_results(s, job_id=job_id)
    # the score: 0 at the val median, the threshold 1.0 (Mahalanobis and shift detector)
    assert thr == 1.0
    assert all(r.unfamiliarity is not None and math.isfinite(r.unfamiliarity) for r in rows)
    assert all(r.unfamiliar == (r.unfamiliarity > thr) for r in rows)
    # with no confidence threshold, exactly the unfamiliar ones need review
    assert all(r.needs_review == r.unfamiliar for r in rows)
    flagged = {r.position for r in rows if r.unfamiliar}
    assert flagged, "some images lie beyond the val threshold"
    out = CliRunner().invoke(cli, ["results", job_id, "--needs-review", "--format", "json"])
    listed = [json.loads(x) for x in out.output.splitlines()]
    assert {d["position"] for d in listed} == flagged and all(d["unfamiliar"] for d in listed)
