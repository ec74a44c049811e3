"""Classify one message's images and write their rows: the body of the inference task."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from db.engine import session_scope
from db.models import Job
from db.service import existing_positions, record_results
from training.model.imaging import ImageError, decode_image
from training.model.preprocess import preprocess
from worker.config import get_worker_settings
from worker.inputs import (
    InputError,
    Item,
    Message,
    MessageError,
    display_ref,
    read_item,
    sha256_hex,
)
from worker.metrics import record_rows, record_stage
from worker.runtime import get_batcher, get_classifier

log = logging.getLogger(__name__)

CHUNK = 64  # images decoded and classified together at most (memory: CHUNK arrays)
MAX_ASPECT = 20  # longer side / shorter side; a 50000x1 strip would resize to gigapixels


def _ts(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def error_row(item: Item, message: str, *, worker: str | None, sha: str | None = None) -> dict:
    """A result row recording why an image has no label."""
    return {
        "position": item.pos,
        "ref": item.ref,
        "sha256": sha,
        "status": "error",
        "error": display_ref(message[:2000]),
        "worker": worker,
        "submitted_at": _ts(item.submitted_at),
    }


class Written(NamedTuple):
    """What one message wrote: rows, how many of them are errors, and why none, if so."""

    rows: int
    errors: int = 0
    note: str | None = None

    def as_result(self) -> dict[str, Any]:
        """The task's result, as Flower shows it: ``{"rows": 4, "errors": 0}``."""
        out: dict[str, Any] = {"rows": self.rows, "errors": self.errors}
        return {**out, "note": self.note} if self.note else out


def classify_message(msg: Message, *, worker: str | None) -> Written:
    """Classify the items of *msg* that have no row yet; say how many rows were written."""
    started = time.time()
    for it in msg.items:
        if it.submitted_at:
            record_stage("queue", started - it.submitted_at)
    with session_scope() as session:
        job = session.get(Job, msg.job_id)
        if job is None:
            raise MessageError(f"unknown job {msg.job_id!r}")
        if job.status == "cancelled":  # `sortline cancel`: its remaining images are skipped
            log.info("job %s is cancelled; skipping %d images", msg.job_id, len(msg.items))
            return Written(0, note="job cancelled")
        done = existing_positions(session, job_id=msg.job_id, positions=[i.pos for i in msg.items])
        total = job.total
    record_stage("lookup", time.time() - started, len(msg.items))
    beyond = [it.pos for it in msg.items if it.pos >= total]
    if beyond:  # the producer numbers a job's images 0..total-1 before sending them
        log.error("job %s: ignoring positions beyond its %d images: %s", msg.job_id, total, beyond)
    todo = [it for it in msg.items if it.pos not in done and it.pos < total]
    if not todo:
        log.info("job %s: all %d positions already recorded", msg.job_id, len(msg.items))
        return Written(0, note="already recorded")

    clf = get_classifier()
    with get_batcher(clf) as batcher:
        rows = _classify_items(todo, clf, batcher, worker=worker)
    now = time.time()
    for r in rows:
        sub = r.get("submitted_at")
        if sub is not None:
            r["latency_ms"] = round((now - sub.timestamp()) * 1000, 3)
    with session_scope() as session:
        written = record_results(session, job_id=msg.job_id, rows=rows)
    record_stage("write", time.time() - now, len(rows))
    record_rows(rows)  # Prometheus, once the rows are stored
    errors = sum(r["status"] == "error" for r in rows)
    return Written(written, min(errors, written))  # exact unless another delivery raced it


def _classify_items(todo: list[Item], clf, batcher, *, worker: str | None) -> list[dict[str, Any]]:
    """Read, decode and preprocess each item here; classify them in shared batches.

    Images are taken in chunks of ``CHUNK``, so a message of many images never holds more
    than one chunk of arrays; one image that cannot be decoded, or exhausts memory doing so,
    gets its own error row and its batch-mates go on.
    """
    rows: list[dict[str, Any]] = []
    for i in range(0, len(todo), CHUNK):
        rows += _classify_chunk(todo[i : i + CHUNK], clf, batcher, worker=worker)
    return rows


def _prepare(data: bytes, spec, *, max_pixels: int) -> np.ndarray:
    """Decode and preprocess, refusing a shape whose resize would be huge before it happens."""
    img = decode_image(data, max_pixels=max_pixels, draft=(spec.resize, spec.resize))
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(
            f"image shape {w}x{h} is beyond the aspect ratio limit of {MAX_ASPECT}:1 "
            f"(resizing its short side to {spec.resize} px would make "
            f"{round(max(w, h) * spec.resize / min(w, h))} px on the long one)"
        )
    return preprocess(img, spec)


def _keep_bytes(s, sha: str, data: bytes) -> None:
    """Keep submitted bytes for `review export` (SORTLINE_BYTES_DIR); a full disk only warns."""
    from worker import bytes_store

    try:
        bytes_store.keep(s.bytes_dir, sha, data, max_bytes=s.bytes_keep_mb * 2**20)
    except OSError as e:
        log.warning("could not keep the bytes of %s in %s: %s", sha[:12], s.bytes_dir, e)


def _classify_chunk(todo: list[Item], clf, batcher, *, worker: str | None) -> list[dict[str, Any]]:
    s = get_worker_settings()
    roots = s.resolved_roots()
    rows: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    pending: list[tuple[Item, str, float]] = []
    for it in todo:
        t0 = time.perf_counter()
        sha = None
        try:
            data = read_item(it, roots=roots, max_bytes=s.max_image_bytes)
            sha = sha256_hex(data)
            if it.data_b64 is not None and s.bytes_dir:
                _keep_bytes(s, sha, data)
            arrays.append(_prepare(data, clf.spec, max_pixels=s.max_image_pixels))
            pending.append((it, sha, (time.perf_counter() - t0) * 1000))
            record_stage("decode", time.perf_counter() - t0)
        except (InputError, ImageError) as e:
            rows.append(error_row(it, str(e), worker=worker, sha=sha))
        except MemoryError:
            rows.append(error_row(it, "out of memory decoding this image", worker=worker, sha=sha))
    if not arrays:
        return rows
    t0 = time.perf_counter()
    probs = batcher.predict(np.stack(arrays))
    share = (time.perf_counter() - t0) * 1000 / len(arrays)
    nc = len(clf.classes)
    for (it, sha, decode_ms), out in zip(pending, probs, strict=True):
        p, score = out[:nc], float(out[nc])
        k = int(p.argmax())
        conf = float(p[k])
        unfamiliar = clf.unfamiliar_threshold is not None and score > clf.unfamiliar_threshold
        rows.append(
            {
                "position": it.pos,
                "ref": it.ref,
                "sha256": sha,
                "status": "ok",
                "label": clf.classes[k],
                "confidence": conf,
                "probs": {c: round(float(v), 6) for c, v in zip(clf.classes, p, strict=True)},
                "model_version": clf.version,
                "worker": worker,
                "processing_ms": round(decode_ms + share, 3),
                "unfamiliarity": None if np.isnan(score) else round(score, 4),
                "unfamiliar": unfamiliar,
                "needs_review": conf < s.review_threshold or unfamiliar,
                "submitted_at": _ts(it.submitted_at),
            }
        )
    return rows


def record_error_rows(job_id: str, items: list[Item], reason: str, *, worker: str | None) -> int:
    """Record *reason* as the error row of each item that has no row yet; return how many.

    Items of an unknown job, or beyond its last position, are only logged.
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.error("no job %r for %d rejected items: %s", job_id, len(items), reason)
            return 0
        rows = [error_row(it, reason, worker=worker) for it in items if it.pos < job.total]
        return record_results(session, job_id=job_id, rows=rows)
