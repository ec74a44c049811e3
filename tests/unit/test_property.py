"""Issue 6, property-based: arbitrary bytes and JSON at the decoder, the message schema and the
task entry point never crash; each ends as a row or a clear rejection."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.support.fixtures import jpeg_bytes
from tests.support.strategies import image_bytes, messages, task_messages
from training.model.imaging import ImageError, decode_image
from training.model.preprocess import PreprocessSpec, load_and_preprocess
from worker.inputs import (
    MAX_POSITION,
    InputError,
    Item,
    MessageError,
    parse_message,
    read_item,
    salvage,
)

SPEC = PreprocessSpec(resize=40, crop=32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on corrupt TIFF/EXIF tags
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_bytes)
def test_decoder_returns_an_image_or_image_error(data):
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except ImageError as e:
        assert str(e)  # a message naming the problem
        event("rejected")
        return
    event("decoded")
    assert img.mode == "RGB" and img.width * img.height <= 4_000_000
    arr = load_and_preprocess(data, SPEC, max_pixels=4_000_000)
    assert arr.shape == (3, 32, 32) and bool((arr == arr).all())  # finite, no NaN


def _storable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


@settings(max_examples=500, deadline=None)
@given(messages())
def test_parse_message_accepts_or_names_the_problem(raw):
    try:
        msg = parse_message(raw)
    except MessageError as e:
        assert str(e)
        found = salvage(raw)  # never raises either
        if found is not None:
            assert all(0 <= it.pos <= MAX_POSITION and _storable(it.ref) for it in found[1])
        return
    assert msg.items and len({it.pos for it in msg.items}) == len(msg.items)
    for it in msg.items:
        assert 0 <= it.pos <= MAX_POSITION and _storable(it.ref)
        assert it.submitted_at is None or math.isfinite(it.submitted_at)
    json.dumps(raw)  # what parses is JSON


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.integers(1, 5000))
def test_read_item_bytes_or_input_error(data_b64, max_bytes):
    try:
        out = read_item(Item(pos=0, ref="k", data_b64=data_b64), roots=[], max_bytes=max_bytes)
    except InputError as e:
        assert str(e)
        return
    assert isinstance(out, bytes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60) | st.sampled_from(["/", "/proc/self/mem", "/dev/zero", "/etc/passwd"]))
def test_read_item_paths_only_under_the_roots(tmp_path_factory, path):
    root = tmp_path_factory.getbasetemp() / "roots-prop"
    root.mkdir(exist_ok=True)
    (root / "a.jpg").write_bytes(b"x")
    try:
        read_item(Item(pos=0, ref=path, path=path), roots=[root.resolve()], max_bytes=1000)
    except InputError as e:
        assert str(e)
        return
    p = Path(os.fsdecode(os.fsencode(path))).resolve()
    assert p == (root / "a.jpg").resolve() or root.resolve() in p.parents


# ------------------------------------------------------------------ the task entry point


@pytest.fixture(scope="module")
def task_env(tiny_model, tmp_path_factory):
    """The inference task run in this process against a SQLite database and the tiny model."""
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.service import create_job
    from worker import runtime
    from worker.config import WorkerSettings

    folder = tmp_path_factory.mktemp("prop-task")
    url = f"sqlite:///{folder / 'sortline.db'}"
    upgrade(url)
    (folder / "photos").mkdir()
    for i in range(3):
        (folder / "photos" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    settings_ = WorkerSettings(allowed_roots=[str(folder / "photos")], task_max_retries=0)
    mp = pytest.MonkeyPatch()
    mp.setenv("SORTLINE_DATABASE_URL", url)
    mp.setattr("worker.classify.get_worker_settings", lambda: settings_)
    mp.setattr("worker.tasks.inference.get_worker_settings", lambda: settings_)
    clf = runtime.Classifier(tiny_model, runtime="torch")
    mp.setattr("worker.classify.get_classifier", lambda: clf)
    with session_scope() as s:
        job_id = create_job(s, source="property", queue="cpu", total=30).id
    yield job_id, folder / "photos"
    mp.undo()


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_task_entry_point_writes_rows_or_rejects(task_env, data):
    from db.engine import session_scope
    from db.models import Job, Result
    from worker.tasks.inference import classify_batch

    job_id, photos = task_env
    raw = data.draw(task_messages(job_id, photos))
    with session_scope() as s:
        s.query(Result).filter(Result.job_id == job_id).delete()
        job = s.get(Job, job_id)
        job.done = job.failed = 0
        job.status = "queued"

    result = classify_batch(raw)  # runs the task body in this process, as the worker's pool does

    n = result["rows"]
    assert isinstance(n, int) and n >= 0
    with session_scope() as s:
        rows = s.scalars(select(Result).where(Result.job_id == job_id)).all()
        job = s.get(Job, job_id)
    assert len(rows) == n == job.done + job.failed
    assert result["errors"] == job.failed
    assert all(r.position < 30 for r in rows)
    assert all((r.status == "ok") == (r.label is not None) for r in rows)
    assert all(r.status == "ok" or r.error for r in rows)
    try:
        msg = parse_message(raw)
    except MessageError:
        found = salvage(raw)
        expected = set() if found is None or found[0] != job_id else {i.pos for i in found[1]}
    else:
        expected = {it.pos for it in msg.items} if msg.job_id == job_id else set()
    assert {r.position for r in rows} == {p for p in expected if p < 30}
    event(
        "ok rows" if any(r.status == "ok" for r in rows) else "error rows" if rows else "rejected"
    )
