"""Issue 17, reliability round two, the classes that need no running services: memory bounded
before it is spent, untrusted text neutralised on its way out, reports confined like workers,
and the smaller ones (ids, stream names, long paths)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from db.engine import session_scope
from db.service import create_job, record_results
from db.text import EscapeControlCharacters, clean_text, csv_cell, is_job_id
from tests.support.fixtures import CLASSES, jpeg_bytes
from training.model.imaging import ImageError
from training.model.preprocess import PreprocessSpec
from worker.inputs import (
    MAX_ITEMS,
    InputError,
    Item,
    MessageError,
    parse_message,
    read_local_file,
    read_stream,
)

HOSTILE_NAMES = [
    '=HYPERLINK("http://x")',
    "+1+2",
    "-2+3",
    "@SUM(A1)",
    "ok\x1b[2J\x1b]0;pwned\x07.jpg",  # clears the screen, sets the terminal title
    "two\nlines.jpg",
    "back\rover.jpg",
    "rtl\u202egpj.exe",
]
CONTROLS = ("\x1b", "\x07", "\r", "\u202e")


# ------------------------------------------------------------------ 4. memory


def test_extreme_aspect_is_refused_before_the_resize():
    from worker.classify import _prepare

    buf = io.BytesIO()
    Image.new("RGB", (50_000, 1), (1, 2, 3)).save(buf, "PNG")  # 50,000 pixels: under the limit
    with pytest.raises(ImageError, match="aspect ratio"):
        _prepare(buf.getvalue(), PreprocessSpec(resize=260, crop=260), max_pixels=50_000_000)


class _Batcher:
    def __init__(self):
        self.sizes: list[int] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        probs = np.full((len(x), len(CLASSES)), 1 / len(CLASSES), np.float32)
        return np.hstack([probs, np.full((len(x), 1), np.nan, np.float32)])  # + unfamiliarity


def test_a_message_of_thousands_of_images_is_classified_in_bounded_chunks(tmp_path):
    """3000 tiny images and one bad one: memory holds one chunk at a time, and only the bad
    image gets an error row."""
    from worker.classify import CHUNK, _classify_items

    clf = SimpleNamespace(
        spec=PreprocessSpec(resize=40, crop=32),
        classes=CLASSES,
        version="t",
        unfamiliar_threshold=None,
    )
    data = jpeg_bytes(1, (8, 8))
    items = [
        Item(pos=i, ref=f"k{i}", data_b64=__import__("base64").b64encode(data).decode())
        for i in range(3000)
    ]
    items[7] = Item(pos=7, ref="strip", data_b64=_b64_png((5000, 1)))
    batcher = _Batcher()
    rows = _classify_items(items, clf, batcher, worker="w")
    assert len(rows) == 3000
    bad = [r for r in rows if r["status"] == "error"]
    assert [r["position"] for r in bad] == [7] and "aspect ratio" in bad[0]["error"]
    assert max(batcher.sizes) <= CHUNK and sum(batcher.sizes) == 2999


def _b64_png(size) -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_message_over_the_image_limit_is_rejected():
    msg = {"v": 1, "job_id": "a" * 32, "items": [{"pos": i, "path": "/x"} for i in range(513)]}
    assert MAX_ITEMS == 512
    with pytest.raises(MessageError, match="at most 512"):
        parse_message(msg)


def test_submit_bytes_refuses_devices_fifos_and_huge_files_before_reading(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        read_local_file("/dev/zero", max_bytes=1000)
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as f:
        f.truncate(20 * 2**30)  # 20 GB of nothing, no disk used
    with pytest.raises(InputError, match="too large: 21474836480 bytes"):
        read_local_file(str(sparse), max_bytes=1000)
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(_raises(read_local_file, str(fifo))))
    t.start()
    t.join(5)
    assert done == ["not a regular file"], "reading a FIFO blocked"
    with pytest.raises(InputError, match="too large"):
        read_stream(io.BytesIO(b"x" * 1001), max_bytes=1000)
    assert read_stream(io.BytesIO(b"x" * 1000), max_bytes=1000) == b"x" * 1000


def _raises(fn, path) -> str:
    try:
        fn(path, max_bytes=1000)
    except InputError as e:
        return "not a regular file" if "not a regular file" in str(e) else str(e)
    return "no error"


def test_submit_bytes_cli_says_why_in_one_line(tmp_path, sqlite_url, monkeypatch):
    from sortline.cli import cli

    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    out = CliRunner().invoke(cli, ["submit", "--bytes", "/dev/zero"])
    assert out.exit_code == 1 and "not a regular file" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ 5. untrusted text out


def test_clean_text_and_csv_cells():
    for name in HOSTILE_NAMES:
        shown = clean_text(name)
        assert not any(c in shown for c in (*CONTROLS, "\n")), shown
    assert clean_text("a\x1b[31mb\n") == "a\\x1b[31mb\\x0a"
    assert clean_text("caf\u00e9 \u4e2d") == "caf\u00e9 \u4e2d"  # letters stay letters
    for cell in ("=1+1", "+1", "-1", "@A1", "\uff1d1"):  # and the full-width "="
        assert csv_cell(cell).startswith("'")
    assert csv_cell("\t=1") == "\\x09=1"  # a leading control is shown, so no formula
    assert csv_cell("plain.jpg") == "plain.jpg" and csv_cell(0.5) == 0.5
    assert is_job_id("0" * 32) and not is_job_id("0" * 31 + "\n") and not is_job_id("a%")


def _hostile_job(url: str) -> str:
    with session_scope(url) as s:
        job = create_job(s, source="src\x1b]0;title\x07\nforged", queue="cpu", total=8)
        rows = []
        for i, name in enumerate(HOSTILE_NAMES):
            ok = i % 2 == 0
            rows.append(
                {
                    "position": i,
                    "ref": f"/d/{name}",
                    "status": "ok" if ok else "error",
                    "label": "glass" if ok else None,
                    "confidence": 0.9 if ok else None,
                    "probs": {c: 1 / 6 for c in CLASSES} if ok else None,
                    "error": None if ok else f"bad {name}",
                }
            )
        record_results(s, job_id=job.id, rows=rows)
        return job.id


def test_results_and_jobs_print_no_escape_sequence_and_no_formula(sqlite_url, monkeypatch):
    from sortline.cli import cli

    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    job_id = _hostile_job(sqlite_url)
    runner = CliRunner()
    for argv in (["results", job_id], ["jobs"], ["status", job_id]):
        out = runner.invoke(cli, argv)
        assert out.exit_code == 0, out.output
        assert not any(c in out.output for c in CONTROLS), (argv, out.output)
    table = runner.invoke(cli, ["results", job_id]).output.splitlines()
    assert len(table) == 1 + len(HOSTILE_NAMES)  # no forged line
    out = runner.invoke(cli, ["results", job_id, "--format", "csv"])
    for row in csv.DictReader(io.StringIO(out.output)):
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@")), value
            assert not any(c in value for c in CONTROLS)
    lines = runner.invoke(cli, ["results", job_id, "--format", "json"]).output.splitlines()
    assert [json.loads(x)["ref"] for x in lines] == [f"/d/{n}" for n in HOSTILE_NAMES]


def test_a_job_id_with_a_newline_cannot_forge_a_log_line():
    record = logging.LogRecord(
        "worker.tasks.inference",
        logging.ERROR,
        __file__,
        1,
        "rejected message for job %s: %s",
        ("ab\n[2026-01-01: INFO] all good\x00", "x"),
        None,
    )
    EscapeControlCharacters().filter(record)
    text = record.getMessage()
    assert "\n" not in text and "\x00" not in text and "\\x0a" in text
    with pytest.raises(MessageError, match="job_id"):
        parse_message({"v": 1, "job_id": "a" * 31 + "\x00", "items": [{"pos": 0, "path": "/a"}]})


def test_worker_log_handlers_escape_control_characters():
    from db.text import escape_log_controls

    stream = io.StringIO()
    logger = logging.getLogger("sortline-test-escape")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    escape_log_controls(logger)
    logger.error("job %s: %s", "x\ny", "\x1b[2J")
    logger.removeHandler(handler)
    assert stream.getvalue() == "job x\\x0ay: \\x1b[2J\n"


# ------------------------------------------------------------------ 6. reports confined


def test_report_and_review_read_rows_under_the_workers_rules(sqlite_url, tmp_path, monkeypatch):
    """A row naming a FIFO, a file outside the allowed roots or a device: the report and the
    review export neither hang nor read it."""
    from producer.review import export_review
    from worker.config import get_worker_settings

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.jpg").write_bytes(jpeg_bytes(1))
    (outside / "secret.jpg").write_bytes(jpeg_bytes(2))
    os.mkfifo(allowed / "fifo.jpg")
    refs = [allowed / "ok.jpg", allowed / "fifo.jpg", outside / "secret.jpg", Path("/dev/zero")]
    monkeypatch.setenv("SORTLINE_ALLOWED_ROOTS", str(allowed))
    get_worker_settings.cache_clear()
    try:
        with session_scope(sqlite_url) as s:
            job = create_job(s, source="t", queue="cpu", total=len(refs))
            record_results(
                s,
                job_id=job.id,
                rows=[
                    {
                        "position": i,
                        "ref": str(r),
                        "status": "ok",
                        "label": "glass",
                        "confidence": 0.1,
                        "probs": {c: 1 / 6 for c in CLASSES},
                        "needs_review": True,
                    }
                    for i, r in enumerate(refs)
                ],
            )
            job_id = job.id
        result: list = []
        t = threading.Thread(
            target=lambda: result.append(export_review(job_id, tmp_path / "out", url=sqlite_url)),
            daemon=True,
        )
        t.start()
        t.join(20)
        assert result, "review export hung"
        manifest = result[0]
        assert [i["position"] for i in manifest["items"]] == [0]
        reasons = {s["position"]: s["reason"] for s in manifest["skipped"]}
        assert "not a regular file" in reasons[1] and "outside the allowed" in reasons[3]
        assert "outside the allowed roots" in reasons[2]
        assert not list((tmp_path / "out").rglob("*secret*"))

        from producer.report import _thumb

        assert _thumb(str(allowed / "ok.jpg")) is not None
        assert _thumb(str(outside / "secret.jpg")) is None
        assert _thumb(str(allowed / "fifo.jpg")) is None
    finally:
        get_worker_settings.cache_clear()


# ------------------------------------------------------------------ 7. smaller ones


def test_stream_keeps_spaces_in_file_names():
    from producer.stream import lines_to_paths

    lines = ["/a/with space \n", "/b/plain.jpg\r\n", "   \n", "/c/ lead.jpg"]
    assert list(lines_to_paths(lines)) == ["/a/with space ", "/b/plain.jpg", "/c/ lead.jpg"]


def test_a_4096_character_path_gets_a_clear_error():
    from worker.inputs import read_item

    path = "/" + "a" * 4095
    with pytest.raises(InputError, match=r"path too long: 4096 bytes, the system allows 4095"):
        read_item(Item(pos=0, ref="x", path=path), roots=[], max_bytes=1000)
    try:
        read_item(Item(pos=0, ref="x", path=path), roots=[], max_bytes=1000)
    except InputError as e:
        assert len(str(e)) < 400  # the path is shortened in the message
