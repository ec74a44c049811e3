"""Issue 7: the review round trip changes the stored labels, visible in `sortline results`."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.service import label_counts, list_results
from producer.submit import submit_paths, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import CLASSES, write_images

pytestmark = pytest.mark.integration


def _results(job_id: str) -> dict[int, dict]:
    out = CliRunner().invoke(cli, ["results", job_id, "--format", "json"])
    assert out.exit_code == 0, out.output
    return {d["position"]: d for d in map(json.loads, out.output.splitlines())}


def test_review_export_move_import_changes_the_labels(make_worker, tmp_path):
    # a threshold above any confidence: every labelled image needs review
    make_worker(env={"SORTLINE_REVIEW_THRESHOLD": "1.01"})
    photos = write_images(tmp_path / "photos", 8)
    job_id = submit_paths(photos)
    wait_for_job(job_id, timeout=60)
    before = _results(job_id)
    assert all(d["needs_review"] and d["corrected_label"] is None for d in before.values())

    exp = tmp_path / "review"
    r = CliRunner().invoke(cli, ["review", "export", job_id[:8], "--out", str(exp)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((exp / "review.json").read_text())
    assert manifest["job_id"] == job_id and len(manifest["items"]) == 8
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == CLASSES
    for it in manifest["items"]:  # each image under its predicted label
        assert (exp / it["label"] / it["file"]).read_bytes() == photos[it["position"]].read_bytes()

    # a person moves two images to other classes, deletes one, leaves the rest
    items = manifest["items"]
    moves = {}
    for it in items[:2]:
        to = next(c for c in CLASSES if c != it["label"])
        shutil.move(exp / it["label"] / it["file"], exp / to / it["file"])
        moves[it["position"]] = to
    deleted = items[2]
    (exp / deleted["label"] / deleted["file"]).unlink()

    train = tmp_path / "train"
    r = CliRunner().invoke(cli, ["review", "import", str(exp), "--add-to", str(train)])
    assert r.exit_code == 0, r.output
    assert "2 labels changed, 5 confirmed, 7 images added" in r.output
    assert "not found (left as it was)" in r.output

    after = _results(job_id)
    for pos, d in after.items():
        assert d["label"] == before[pos]["label"]  # the model's label is kept
        if pos in moves:
            assert d["corrected_label"] == moves[pos] and not d["needs_review"]
        elif pos == deleted["position"]:
            assert d["corrected_label"] is None and d["needs_review"]
        else:
            assert d["corrected_label"] == d["label"] and not d["needs_review"]
    table = CliRunner().invoke(cli, ["results", job_id]).output.splitlines()
    for pos, to in moves.items():
        row = next(line for line in table[1:] if int(line.split()[0]) == pos)
        assert row.split()[1] == to
    with session_scope() as s:
        counts = label_counts(s, job_id=job_id)
        for pos, to in moves.items():
            assert pos in [x.position for x in list_results(s, job_id=job_id, label=to)]
    assert sum(counts.values()) == 8
    added = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.jpg"))
    assert len(added) == 7
    for pos, to in moves.items():
        assert any(a.startswith(f"{to}/") and f"{pos:06d}_" in a for a in added)

    # importing again changes nothing; a second export holds only the image left alone
    r = CliRunner().invoke(cli, ["review", "import", str(exp), "--add-to", str(train)])
    assert r.exit_code == 0 and "0 images added" in r.output
    assert _results(job_id) == after
    again = CliRunner().invoke(cli, ["review", "export", job_id, "--out", str(exp)])
    assert again.exit_code == 1 and "already holds a review export" in again.output
    r = CliRunner().invoke(cli, ["review", "export", job_id, "--out", str(tmp_path / "r2")])
    assert r.exit_code == 0 and "exported 1 images" in r.output


def test_review_import_of_a_folder_without_manifest(tmp_path, db_url):
    (tmp_path / "glass").mkdir()
    r = CliRunner().invoke(cli, ["review", "import", str(tmp_path)])
    assert r.exit_code == 1 and "has no review.json" in r.output
