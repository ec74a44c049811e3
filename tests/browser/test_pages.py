"""Issue 7: every HTML page loads in headless Chromium without console errors, shows every
chart, and leaves a screenshot."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from db.engine import session_scope
from db.service import create_job, record_results
from producer.report import job_report
from tests.support.fixtures import CLASSES, jpeg_bytes
from tests.unit.test_report_run import make_run
from training.reports.eda import run_eda
from training.reports.run import compare_runs, run_report

TRASHNET = Path(__file__).resolve().parents[3] / "shared" / "trashnet"


def _check(browser, page: Path, screenshots: Path, n_charts: int) -> None:
    shot = screenshots / f"{page.parent.name}-{page.stem}.png"
    result = browser.check(page, shot)
    print(f"screenshot: {shot}")
    assert result.errors == [], result.errors
    assert len(result.images) == n_charts, result.images
    assert result.broken_images == []
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height > 600


def _photo(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (96, 128), (245, 245, 240))
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x, y = rng.randrange(10, 60), rng.randrange(10, 90)
        d.ellipse(
            (x, y, x + rng.randrange(10, 30), y + rng.randrange(10, 30)),
            fill=tuple(rng.randrange(200) for _ in range(3)),
        )
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def test_eda_page(browser, screenshots, tmp_path):
    data = tmp_path / "data"
    for k, c in enumerate(CLASSES[:3]):
        (data / c).mkdir(parents=True)
        for i in range(4):
            (data / c / f"{c}{i}.jpg").write_bytes(_photo(10 * k + i))
    (data / "glass" / "copy.jpg").write_bytes(_photo(0))  # a cross-class copy: a dup gallery
    s = run_eda(data, tmp_path / "eda")
    _check(browser, tmp_path / "eda" / "eda.html", screenshots, len(s["charts"]))


def test_job_report_page(browser, screenshots, tmp_path, sqlite_url):
    rows = []
    for i, c in enumerate(CLASSES * 2):
        p = tmp_path / "photos" / c / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(i, size=(96, 128)))
        probs = {k: 0.5 if k == CLASSES[i % 3] else 0.1 for k in CLASSES}
        rows.append(
            {
                "position": i,
                "ref": str(p),
                "status": "ok",
                "label": CLASSES[i % 3],
                "confidence": 0.3 + i / 30,
                "probs": probs,
                "needs_review": i < 8,
            }
        )
    rows.append(
        {
            "position": len(rows),
            "ref": "/gone.jpg",
            "status": "error",
            "error": "cannot read /gone.jpg: no such file",
        }
    )
    with session_scope(sqlite_url) as s:
        job = create_job(s, source="photos", queue="cpu", total=len(rows))
        record_results(s, job_id=job.id, rows=rows)
        job_id = job.id
    rep = job_report(job_id, tmp_path / "job", url=sqlite_url)
    assert "labelled" in rep and rep["n_errors"] == 1
    _check(browser, tmp_path / "job" / "report.html", screenshots, len(rep["charts"]))


def test_run_and_comparison_pages(browser, screenshots, tmp_path):
    runs = [make_run(tmp_path / "runs", n, a) for n, a in (("none", 0.8), ("flip", 0.86))]
    _check(browser, run_report(runs[0], tmp_path / "run"), screenshots, 2)
    _check(browser, compare_runs(runs, tmp_path / "compare"), screenshots, 3)


def test_the_checker_sees_errors_and_broken_images(browser, screenshots, tmp_path):
    """The checks above are not vacuous: a console error, an exception and a broken image."""
    page = tmp_path / "bad" / "bad.html"
    page.parent.mkdir()
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png" alt="x"><script>console.error("boom");'
        "undefined_function();</script></body></html>"
    )
    result = browser.check(page, screenshots / "bad.png")
    text = " ".join(result.errors)
    assert "console: boom" in text and "exception:" in text, result.errors
    assert "missing.png" in text or "network:" in text, result.errors
    assert len(result.broken_images) == 1


@pytest.mark.slow
@pytest.mark.skipif(not TRASHNET.is_dir(), reason=f"TrashNet copy not at {TRASHNET}")
def test_eda_page_of_trashnet(browser, screenshots, tmp_path):
    s = run_eda(TRASHNET, tmp_path / "trashnet")
    _check(browser, tmp_path / "trashnet" / "eda.html", screenshots, len(s["charts"]))
