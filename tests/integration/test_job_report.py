"""Issue 7: the job report; over a labelled folder its accuracy equals `sortline evaluate`'s."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.service import create_job, record_results
from producer.report import job_report
from producer.submit import submit_paths, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import CLASSES, jpeg_bytes, write_images

pytestmark = pytest.mark.integration


def _labelled_folder(root, per_class: int = 6):
    for k, c in enumerate(CLASSES):
        for i in range(per_class):
            (root / c).mkdir(parents=True, exist_ok=True)
            (root / c / f"{c}{i}.jpg").write_bytes(jpeg_bytes(1000 * k + i, size=(64, 48)))
    (root / "glass" / "broken.jpg").write_bytes(jpeg_bytes(5)[:150])  # an error row
    return root


def test_job_over_labelled_folder_reports_the_accuracy_of_evaluate(
    make_worker, tiny_model, tmp_path
):
    data = _labelled_folder(tmp_path / "labelled")
    make_worker()
    job_id = submit_paths([data], recursive=True, batch_size=8)
    wait_for_job(job_id, timeout=120)

    out = tmp_path / "report"
    r = CliRunner().invoke(cli, ["report", job_id[:8], "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    ev = CliRunner().invoke(
        cli, ["evaluate", "--checkpoint", str(tiny_model), "--data", str(data), "--json"]
    )
    assert ev.exit_code == 0, ev.output
    expected = json.loads(ev.output.strip().splitlines()[-1])

    got = rep["labelled"]
    assert got["n"] == expected["n"] == 6 * len(CLASSES)  # the broken file is left out by both
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
    assert got["confusion"] == expected["confusion"]
    for c in CLASSES:
        for k in ("precision", "recall", "f1", "support"):
            assert got["per_class"][c][k] == pytest.approx(expected["per_class"][c][k], abs=1e-12)
    assert f"accuracy {expected['accuracy']:.4f}" in r.output

    # the rest of the page: errors with their message, the review gallery, the charts
    assert rep["n_errors"] == 1 and "truncated" in rep["errors"][0]["error"]
    assert rep["errors"][0]["ref"].endswith("glass/broken.jpg")
    assert len(rep["lowest_confidence"]) == 24
    confs = [x["confidence"] for x in rep["lowest_confidence"]]
    assert confs == sorted(confs)
    assert set(rep["charts"]) == {"labels", "confidence", "lowest", "confusion"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "broken.jpg" in html and "Accuracy against the folder names" in html


def test_report_of_an_unlabelled_job_and_of_an_unknown_one(db_url, tmp_path):
    photos = write_images(tmp_path / "photos", 5)
    rows = [
        {
            "position": i,
            "ref": str(p),
            "status": "ok",
            "label": CLASSES[i],
            "confidence": 0.5,
            "probs": {c: 0.1 for c in CLASSES} | {CLASSES[i]: 0.5},
        }
        for i, p in enumerate(photos)
    ]
    with session_scope() as s:
        job_id = create_job(s, source="photos", queue="cpu", total=5).id
        record_results(s, job_id=job_id, rows=rows)
    rep = job_report(job_id, tmp_path / "r")
    assert (
        "labelled" not in rep and rep["n_ok"] == 5 and rep["labels"] == {c: 1 for c in CLASSES[:5]}
    )
    assert set(rep["charts"]) == {"labels", "confidence", "lowest"}
    r = CliRunner().invoke(cli, ["report", "feedbeef", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no job 'feedbeef'" in r.output
    r = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "either JOB or" in r.output
