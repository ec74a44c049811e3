"""Issue 6, hostile and unusual input through a real worker, and the queue as an attack surface.

Each input ends as a classified row (valid images) or an error row naming the problem, and
the rest of the job always completes.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from kombu import Connection, Exchange, Producer

from db.engine import reset_engines, session_scope
from db.migrate import upgrade
from db.service import create_job
from producer.submit import TASK, send_items, submit_bytes, wait_for_job
from tests.support import hostile
from tests.support.fixtures import CLASSES, jpeg_bytes, write_images
from tests.support.own_broker import broker, make_worker, prometheus_samples, rows_by_position  # noqa: F401  (fixtures)
from tests.support.servers import RedisServer, use_broker
from tests.support.services import CeleryWorker, create_pg_database, drop_pg_database, wait_until
from worker.inputs import build_message

pytestmark = pytest.mark.integration

MAX_BYTES = 100_000
# where the database makes no difference, or PostgreSQL is the stricter one (text encoding)
PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _make_files(tmp_path):
    """Hostile files under an allowed root, and a few outside it; (path, expectation) pairs."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    cases: list[tuple[str, bool, str]] = []  # (path, ok, error fragment)
    for c in hostile.FILE_CASES:
        (allowed / c.name).write_bytes(c.make())
        cases.append((str(allowed / c.name), c.ok, c.error))
    good = write_images(allowed, 3, prefix="good")
    cases += [(str(p), True, "") for p in good]
    (allowed / "upright.jpg").write_bytes(hostile.jpeg_upright())
    cases.append((str(allowed / "upright.jpg"), True, ""))
    # a valid JPEG, padded past SORTLINE_MAX_IMAGE_BYTES
    (allowed / "big.jpg").write_bytes(jpeg_bytes(5) + b"\0" * MAX_BYTES)
    cases.append((str(allowed / "big.jpg"), False, "too large"))
    # a non-UTF-8 file name: a valid image, read by its real name
    with open(os.fsencode(allowed) + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpeg_bytes(6))
    cases.append((os.fsdecode(os.fsencode(allowed) + b"/caf\xe9.jpg"), True, ""))
    (allowed / "a-folder").mkdir()
    cases.append((str(allowed / "a-folder"), False, "is a directory"))
    cases.append((str(allowed / "missing.jpg"), False, "file not found"))
    (outside / "secret.jpg").write_bytes(jpeg_bytes(7))
    cases.append((str(outside / "secret.jpg"), False, "outside the allowed roots"))
    (allowed / "escape.jpg").symlink_to(outside / "secret.jpg")
    cases.append((str(allowed / "escape.jpg"), False, "a link resolving to"))
    cases.append((str(allowed / ".." / "outside" / "secret.jpg"), False, "outside the allowed"))
    return allowed, cases


def test_every_hostile_file_gets_a_row(make_worker, tmp_path):
    allowed, cases = _make_files(tmp_path)
    make_worker(
        concurrency=2,
        env={"SORTLINE_ALLOWED_ROOTS": str(allowed), "SORTLINE_MAX_IMAGE_BYTES": str(MAX_BYTES)},
    )
    n_files = len(cases)
    rejected = 3  # positions carried by messages the worker must reject
    with session_scope() as s:
        job_id = create_job(s, source="hostile", queue="cpu", total=n_files + rejected).id
    send_items(
        job_id,
        [{"pos": i, "path": p} for i, (p, _, _) in enumerate(cases)],
        queue="cpu",
        batch_size=4,
    )
    from worker.app import app

    now = time.time()
    future = build_message(job_id, [{"pos": n_files, "path": cases[0][0]}], now)
    future["v"] = 2  # an unknown schema version
    no_version = build_message(job_id, [{"pos": n_files + 1, "path": cases[0][0]}], now)
    del no_version["v"]
    no_ref = build_message(job_id, [{"pos": n_files + 2}], now)  # neither path nor data
    no_job = {"v": 1, "items": [{"pos": 0, "path": cases[0][0]}]}  # no job: only logged
    for body in (future, no_version, no_ref, no_job):
        app.send_task(TASK, args=[body], queue="cpu")

    job = wait_for_job(job_id, timeout=120)
    rows = rows_by_position(job_id)
    assert sorted(rows) == list(range(n_files + rejected))
    expected_ok = sum(ok for _, ok, _ in cases)
    assert (job.done, job.failed) == (expected_ok, n_files + rejected - expected_ok)
    for pos, (path, ok, fragment) in enumerate(cases):
        r = rows[pos]
        if ok:
            assert r.status == "ok" and r.label in CLASSES, (path, r.error)
        else:
            assert r.status == "error" and fragment in r.error.lower(), (path, r.error)
    assert "unknown message schema version 2" in rows[n_files].error
    assert "schema version none" in rows[n_files + 1].error.lower()
    assert "neither 'path' nor 'data'" in rows[n_files + 2].error

    by_name = {os.path.basename(r.ref): r for r in rows.values()}
    assert by_name["caf\\xe9.jpg"].status == "ok"  # stored as text, read by its real name
    # the EXIF-rotated photo is classified as the upright one is
    rot, up = by_name["exif-rotated.jpg"], by_name["upright.jpg"]
    assert rot.label == up.label
    assert np.allclose([rot.probs[c] for c in CLASSES], [up.probs[c] for c in CLASSES], atol=0.02)
    # nothing from outside the roots was read: its bytes have no hash in the rows
    outside = {i for i, (p, _, f) in enumerate(cases) if "outside" in f or "link" in f}
    assert all(rows[i].sha256 is None for i in outside)


def test_hostile_bytes_get_rows(make_worker):
    make_worker(env={"SORTLINE_MAX_IMAGE_BYTES": str(MAX_BYTES)})
    images = [(c.name, c.make()) for c in hostile.FILE_CASES]
    images.append(("big", jpeg_bytes(5) + b"\0" * MAX_BYTES))
    job_id = submit_bytes(images, batch_size=5)
    job = wait_for_job(job_id, timeout=120)
    rows = rows_by_position(job_id)
    assert job.finished == len(images) == len(rows)
    for pos, c in enumerate(hostile.FILE_CASES):
        r = rows[pos]
        assert r.ref == c.name
        if c.ok:
            assert r.status == "ok", (c.name, r.error)
        else:
            assert r.status == "error" and c.error in r.error.lower(), (c.name, r.error)
    assert rows[len(images) - 1].status == "error" and "too large" in rows[len(images) - 1].error


# ------------------------------------------------------------------ the queue as a way in


class _Exploit:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@PG_ONLY
def test_pickle_and_garbage_messages_are_refused(make_worker, tmp_path):
    w = make_worker()
    marker = tmp_path / "pwned"
    from worker.app import app

    # a pickled task message carrying code to run
    app.send_task(TASK, args=[_Exploit(str(marker))], queue="cpu", serializer="pickle")
    with Connection(app.conf.broker_url) as conn:
        producer = Producer(conn, exchange=Exchange("cpu", type="direct"), routing_key="cpu")
        producer.publish({"hello": "not a task"}, serializer="json")  # no task headers
        producer.publish(
            b"\x80\x04garbage",
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
    app.send_task(TASK, args=[], queue="cpu")  # the wrong number of arguments
    app.send_task(TASK, args=["a string", 2], kwargs={"evil": 1}, queue="cpu")
    app.send_task(TASK, args=[[1, 2, 3]], queue="cpu")  # not an object
    app.send_task("worker.tasks.inference.no_such_task", args=[{}], queue="cpu")

    # the worker goes on: a real job sent after all that completes
    job_id = submit_bytes([jpeg_bytes(i) for i in range(4)], batch_size=2)
    job = wait_for_job(job_id, timeout=60)
    assert (job.done, job.failed) == (4, 0)
    with app.connection() as conn:
        wait_until(lambda: conn.default_channel.client.llen("cpu") == 0, timeout=30)
    time.sleep(0.5)
    assert not marker.exists()
    assert w.proc.poll() is None
    log = w.log.read_text(errors="replace")
    assert "untrusted content" in log.lower() or "disallowed" in log.lower(), log[-3000:]


def test_no_secret_in_worker_logs(tiny_model, tmp_path, monkeypatch):
    """Broker and database passwords and the Flower password never reach the logs."""
    broker_pw, db_pw, flower_pw = "brokerPW-7f3a9c", "dbPW-51e0b2", "flowerPW-c4d8e1"
    redis_server = RedisServer(tmp_path / "redis", password=broker_pw).start()
    app, original = use_broker(monkeypatch, redis_server.url)
    url = create_pg_database()
    upgrade(url)
    url = url.replace("postgres@", f"postgres:{db_pw}@")  # trust auth: accepted, unused
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    env = {
        "SORTLINE_BROKER_URL": redis_server.url,
        "SORTLINE_DATABASE_URL": url,
        "SORTLINE_MODEL": str(tiny_model),
        "SORTLINE_FLOWER_USER": "admin",
        "SORTLINE_FLOWER_PASSWORD": flower_pw,
    }
    w = CeleryWorker(env, log=tmp_path / "worker.log", extra=["-l", "DEBUG"])
    try:
        w.start()
        job_id = submit_bytes([jpeg_bytes(i) for i in range(3)] + [b"junk"], batch_size=2)
        wait_for_job(job_id, timeout=60)
        os.kill(w.children()[0], signal.SIGKILL)  # an error path too
        time.sleep(1)
    finally:
        w.stop()
        app.close()
        original.set_current()
        redis_server.stop(signal.SIGKILL)
        reset_engines()
        drop_pg_database(url.replace(f":{db_pw}", ""))
    log = w.log.read_text(errors="replace")
    assert "://:**@127.0.0.1" in log  # the banner shows the broker (our Redis transport), masked
    for secret in (broker_pw, db_pw, flower_pw):
        assert secret not in log


@PG_ONLY
def test_tampered_model_is_refused_by_the_worker(make_worker, tiny_model, db_url, tmp_path):
    """A checkpoint changed after registration is not loaded; the job's rows say why."""
    import shutil

    from db.service import register_model
    from training.model.checkpoint import file_sha256, read_metadata

    path = tmp_path / "registered.safetensors"
    shutil.copy(tiny_model, path)
    meta = read_metadata(path)
    with session_scope() as s:
        register_model(
            s,
            name="tiny-test",
            version="0",
            arch=meta["arch"],
            path=str(path.resolve()),
            sha256=file_sha256(path),
            classes=meta["classes"],
        )
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    make_worker(env={"SORTLINE_MODEL": str(path), "SORTLINE_TASK_MAX_RETRIES": "0"})
    job_id = submit_bytes([jpeg_bytes(i) for i in range(3)], batch_size=3)
    job = wait_for_job(job_id, timeout=60)
    rows = rows_by_position(job_id)
    assert (job.done, job.failed) == (0, 3)
    assert all("sha256" in r.error and "registry" in r.error for r in rows.values())


@PG_ONLY
@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_fuzzed_messages_to_a_real_worker(make_worker, tmp_path):
    """80 hypothesis-drawn messages through Redis to a real worker: it stays up, and every
    position a message (or the salvage of a rejected one) names gets its row."""
    from hypothesis import strategies as st

    from tests.support.strategies import task_messages
    from worker.inputs import MessageError, parse_message, salvage

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    w = make_worker(concurrency=2, env={"SORTLINE_ALLOWED_ROOTS": str(photos)})
    total = 30
    with session_scope() as s:
        job_id = create_job(s, source="fuzz", queue="cpu", total=total).id
    bodies = st.lists(task_messages(job_id, photos), min_size=80, max_size=80).example()
    from worker.app import app

    expected: set[int] = set()
    for body in bodies:
        app.send_task(TASK, args=[body], queue="cpu")
        try:
            msg = parse_message(body)
            if msg.job_id == job_id:
                expected |= {it.pos for it in msg.items}
        except MessageError:
            found = salvage(body)
            if found and found[0] == job_id:
                expected |= {it.pos for it in found[1]}
    expected = {p for p in expected if p < total}
    # a valid job sent last: once it is done, every message before it has been taken
    last = submit_bytes([jpeg_bytes(9)], batch_size=1)
    wait_for_job(last, timeout=120)
    with app.connection() as conn:
        wait_until(lambda: conn.default_channel.client.llen("cpu") == 0, timeout=60)
    wait_until(lambda: set(rows_by_position(job_id)) == expected, timeout=60)
    rows = rows_by_position(job_id)
    with session_scope() as s:
        from db.service import get_job

        job = get_job(s, job_id=job_id)
    assert job.done + job.failed == len(rows) == len(expected)
    assert all(r.status == "ok" or r.error for r in rows.values())
    assert w.proc.poll() is None
    print(
        f"\n{len(bodies)} messages: {len(expected)} positions recorded, "
        f"{sum(r.status == 'ok' for r in rows.values())} classified"
    )


@PG_ONLY
def test_non_utf8_names_through_the_producer(make_worker, tmp_path):
    """`submit_paths` given a non-UTF-8 file name, by itself and in a folder."""
    from producer.submit import submit_paths

    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    for name in (b"caf\xe9.jpg", b"na\xefve.jpg"):
        with open(folder + b"/" + name, "wb") as f:
            f.write(jpeg_bytes(len(name)))
    make_worker()
    one = submit_paths([os.fsdecode(folder + b"/caf\xe9.jpg")])
    both = submit_paths([os.fsdecode(folder)])
    for job_id, n in ((one, 1), (both, 2)):
        job = wait_for_job(job_id, timeout=60)
        assert (job.done, job.failed) == (n, 0)
        assert all("\\x" in r.ref for r in rows_by_position(job_id).values())
    with session_scope() as s:
        from db.service import get_job

        assert get_job(s, job_id=one).source.endswith("caf\\xe9.jpg")
