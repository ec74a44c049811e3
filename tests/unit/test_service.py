"""The db service layer on SQLite: idempotent result rows and job counters."""

from __future__ import annotations

import pytest

from db.engine import session_scope
from db.service import (
    NotFound,
    PromotionRefused,
    activate_model,
    active_model,
    create_job,
    get_job,
    label_counts,
    list_models,
    list_results,
    record_results,
    register_model,
)


def _ok(pos: int, label: str = "glass", conf: float = 0.9) -> dict:
    return {
        "position": pos,
        "ref": f"/x/{pos}.jpg",
        "status": "ok",
        "label": label,
        "confidence": conf,
        "probs": {label: conf},
        "model_version": "m:1",
    }


def _err(pos: int) -> dict:
    return {"position": pos, "ref": f"/x/{pos}.jpg", "status": "error", "error": "boom"}


def test_record_results_is_idempotent_and_counts_only_new_rows(sqlite_url):
    with session_scope(sqlite_url) as s:
        job_id = create_job(s, source="t", queue="cpu", total=4).id
    with session_scope(sqlite_url) as s:
        assert record_results(s, job_id=job_id, rows=[_ok(0), _err(1)]) == 2
    with session_scope(sqlite_url) as s:  # redelivery of the same rows
        assert record_results(s, job_id=job_id, rows=[_ok(0), _err(1)]) == 0
    with session_scope(sqlite_url) as s:
        job = get_job(s, job_id=job_id)
        assert (job.done, job.failed, job.status) == (1, 1, "running")
        assert job.model_version == "m:1"
    with session_scope(sqlite_url) as s:
        assert record_results(s, job_id=job_id, rows=[_ok(2, "metal", 0.4), _ok(3), _ok(0)]) == 2
    with session_scope(sqlite_url) as s:
        job = get_job(s, job_id=job_id)
        assert (job.done, job.failed, job.status) == (3, 1, "done")
        assert job.finished_at is not None
        assert label_counts(s, job_id=job_id) == {"glass": 2, "error": 1, "metal": 1}
        assert [r.position for r in list_results(s, job_id=job_id, max_confidence=0.5)] == [2]
        assert [r.position for r in list_results(s, job_id=job_id, status="error")] == [1]


def test_get_job_by_prefix_and_latest(sqlite_url):
    with session_scope(sqlite_url) as s:
        a = create_job(s, source="a", queue="cpu", total=1).id
    with session_scope(sqlite_url) as s:
        assert get_job(s, job_id=a[:6]).id == a
        assert get_job(s, job_id="latest").id == a
        with pytest.raises(NotFound, match="not a job id"):
            get_job(s, job_id="nope-nope")
        with pytest.raises(NotFound, match="no job"):
            get_job(s, job_id="f" * 32 if not a.startswith("f") else "e" * 32)


def test_job_ids_are_checked_and_prefixes_never_wildcards(sqlite_url):
    """Issue 17.5/17.7: an ambiguous prefix says so; `%`, `_`, newlines and NULs are not ids."""
    from db.models import Job

    with session_scope(sqlite_url) as s:
        s.add_all([Job(id="abcd" + "0" * 28, total=1), Job(id="abcd" + "1" * 28, total=1)])
    with session_scope(sqlite_url) as s:
        with pytest.raises(NotFound, match="ambiguous"):
            get_job(s, job_id="abcd")
        assert get_job(s, job_id="ABCD1").id == "abcd" + "1" * 28  # hex in either case
        for bad in ("abc%", "ab_d", "%", "abcd\n", "abcd\x00", "abcd0000' OR 1=1", "abc"):
            with pytest.raises(NotFound, match="not a job id") as e:
                get_job(s, job_id=bad)
            assert "\n" not in str(e.value) and "\x00" not in str(e.value)


def _register(s, version: str, val_f1: float | None):
    metrics = {"val": {"macro_f1": val_f1}} if val_f1 is not None else {}
    return register_model(
        s,
        name="m",
        version=version,
        arch="tiny",
        path=f"/m{version}",
        sha256=version * 64,
        classes=["a"],
        metrics=metrics,
    )


def test_the_shipped_model_is_registered_and_active_after_the_migrations(sqlite_url):
    from training.config import DEFAULT_CHECKPOINT
    from training.model.checkpoint import file_sha256, model_version, read_metadata

    with session_scope(sqlite_url) as s:
        rec = active_model(s)
        assert f"{rec.name}:{rec.version}" == model_version(read_metadata(DEFAULT_CHECKPOINT))
        assert rec.sha256 == file_sha256(DEFAULT_CHECKPOINT)
        assert rec.metrics["val"]["macro_f1"] > 0.9


def test_registering_makes_a_candidate_and_activation_keeps_one_active(sqlite_url):
    with session_scope(sqlite_url) as s:
        shipped = active_model(s)
        _register(s, "1", 0.95)
        _register(s, "2", 0.97)
    with session_scope(sqlite_url) as s:
        assert active_model(s).id == shipped.id  # candidates only
        activate_model(s, ref="m:2")
    with session_scope(sqlite_url) as s:
        assert active_model(s).version == "2"
        assert [r.version for r in list_models(s) if r.active] == ["2"]


def test_activation_refuses_a_weaker_model_unless_forced(sqlite_url):
    with session_scope(sqlite_url) as s:
        _register(s, "good", 0.96)
        _register(s, "worse", 0.93)
        _register(s, "tiny", 0.2)
        _register(s, "nometrics", None)
        activate_model(s, ref="m:good")
        with pytest.raises(PromotionRefused, match=r"below the active m:good's 0\.960; --force"):
            activate_model(s, ref="m:worse")
        with pytest.raises(PromotionRefused, match="below the floor 0.500"):
            activate_model(s, ref="m:tiny", floor=0.5)
        with pytest.raises(PromotionRefused, match="no recorded val macro_f1"):
            activate_model(s, ref="m:nometrics")
        with pytest.raises(NotFound, match="sortline models"):
            activate_model(s, ref="m:9")
        assert active_model(s).version == "good"
        activate_model(s, ref="m:worse", force=True)  # the rollback
        assert active_model(s).version == "worse"


@pytest.mark.parametrize("stale_was_active", [True, False])
def test_a_reshipped_model_file_is_registered_and_replaces_only_a_stale_active_row(
    tmp_path, stale_was_active
):
    """Migration 0005: a database migrated when the shipped file held another version."""
    import sqlalchemy as sa

    from db.engine import get_engine
    from db.migrate import upgrade
    from training.config import DEFAULT_CHECKPOINT
    from training.model.checkpoint import read_metadata

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0004")
    with get_engine(url).begin() as conn:  # as if 0002 had registered an earlier file
        conn.execute(sa.text("UPDATE models SET version = 'old', sha256 = 'stale'"))
    with session_scope(url) as s:
        if not stale_was_active:
            _register(s, "mine", 0.97)
            activate_model(s, ref="m:mine", force=True)
    upgrade(url)
    shipped = read_metadata(DEFAULT_CHECKPOINT)
    with session_scope(url) as s:
        rows = {r.version: r for r in list_models(s)}
        assert shipped["version"] in rows and "old" in rows
        expected = shipped["version"] if stale_was_active else "mine"
        assert active_model(s).version == expected
        assert [r.version for r in rows.values() if r.active] == [expected]
    upgrade(url)  # idempotent
