"""Issue 15, acceptance 4: a job, `review export`, a person's moves, `review import`, then
`sortline adapt --reviewed` on the folder they leave, with a running worker."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from producer.submit import submit_paths, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import tiny_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny model trained on generated photos: the site's current model."""
    return tiny_run(tmp_path_factory.mktemp("adapt"))


def test_review_loop_then_adapt_on_the_reviewed_folder(base, make_worker, tmp_path):
    from training.model.checkpoint import read_metadata

    data, cache = base["data"], base["cache"]
    # a threshold above any confidence: every labelled image needs review
    make_worker(env={"SORTLINE_MODEL": base["checkpoint"], "SORTLINE_REVIEW_THRESHOLD": "1.01"})
    photos = (
        sorted((data / "glass").glob("glass[0-9].jpg"))[:3]
        + sorted((data / "paper").glob("paper[0-9].jpg"))[:3]
    )
    job_id = submit_paths(photos)
    wait_for_job(job_id, timeout=60)

    exp = tmp_path / "review"
    r = CliRunner().invoke(cli, ["review", "export", job_id, "--out", str(exp)])
    assert r.exit_code == 0 and "exported 6 images" in r.output, r.output
    items = json.loads((exp / "review.json").read_text())["items"]
    truth = {}  # a person files each photo under its true class
    for it in items:
        right = photos[it["position"]].parent.name
        if right != it["label"]:
            shutil.move(exp / it["label"] / it["file"], exp / right / it["file"])
        truth[it["file"]] = right
    r = CliRunner().invoke(cli, ["review", "import", str(exp)])
    assert r.exit_code == 0, r.output

    r = CliRunner().invoke(cli, ["adapt", "--reviewed", str(exp), "--base", base["checkpoint"], "--out",
                                 str(tmp_path / "adapted"), "--cache-dir", str(cache),
                                 "--steps", "20", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["model"] == "sortline-trashnet:1.0.1" and s["reviewed"] == 6
    assert s["registered"] == s["model"] and "activated" not in s
    photos_seen = read_metadata(s["checkpoint"])["adapted"]["photos"]
    assert {p["file"].split("/", 1)[1]: p["label"] for p in photos_seen} == truth
    listed = CliRunner().invoke(cli, ["models", "--json"])
    rows = {d["model"]: d for d in map(json.loads, listed.output.splitlines())}
    assert s["model"] in rows and not rows[s["model"]]["active"]  # a candidate
