"""The review loop: export a job's doubtful images into class-named folders, let a person move
the misfiled ones, and import the folders back as corrected labels (database only, no torch).

An export folder holds one sub-folder per class, each image under its predicted label as
``<position>_<name>``, and ``review.json``: the job, its classes and one entry per image. On
import, an image's folder is its label; images deleted from the folder are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from db.engine import session_scope
from db.models import Result
from db.service import get_job, review_results, set_corrected_labels
from db.text import clean_text
from sortline.errors import SortlineError
from worker.inputs import InputError, read_stored_ref

log = logging.getLogger(__name__)

MANIFEST = "review.json"


class ReviewError(SortlineError, ValueError):
    """An export or import that cannot be done; the message says what to do."""


def _classes(session, job_id: str) -> list[str]:
    probs = session.scalars(
        select(Result.probs)
        .where(Result.job_id == job_id, Result.status == "ok", Result.probs.is_not(None))
        .limit(1)
    ).first()
    return list(probs or {})


def _image_bytes(ref: str, sha: str | None) -> bytes:
    """A result's image: the file it names, or submitted bytes kept in SORTLINE_BYTES_DIR."""
    if Path(ref).is_absolute():
        return read_stored_ref(ref)
    from worker import bytes_store
    from worker.config import get_worker_settings

    kept = bytes_store.find(get_worker_settings().bytes_dir, sha)
    if kept is None:
        raise InputError(
            "sent as bytes and not kept (set SORTLINE_BYTES_DIR on the workers and here; "
            "or it was pruned beyond SORTLINE_BYTES_KEEP_MB)"
        )
    return kept.read_bytes()


def export_review(
    job_id: str, out: str | Path, *, threshold: float | None = None, url: str | None = None
) -> dict:
    """Copy the job's images awaiting review into *out*/<predicted label>/; write review.json.

    Without *threshold*, the images the worker marked ``needs_review``; with it, those whose
    confidence is below it and not yet corrected. Returns the manifest.
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ReviewError(
            f"{out} already holds a review export ({MANIFEST}); import it with "
            f"`sortline review import {out}` or export into another folder"
        )
    with session_scope(url) as session:
        job = get_job(session, job_id=job_id)
        results = review_results(session, job_id=job.id, max_confidence=threshold)
        classes = _classes(session, job.id)
        rows = [(r.position, r.ref, r.label or "", r.confidence, r.sha256) for r in results]
        job_id = job.id
    for label in {r[2] for r in rows} - set(classes):
        classes.append(label)
    bad = [c for c in classes if not _plain_name(c)]
    if bad:
        raise ReviewError(f"labels that are not folder names: {clean_text(bad)}; nothing exported")
    for c in classes:
        (out / c).mkdir(parents=True, exist_ok=True)
    items, skipped = [], []
    for position, ref, label, confidence, sha in rows:
        name = f"{position:06d}_{Path(ref).name}"
        try:  # under the workers' rules: allowed roots, a regular file, the size limit
            (out / label / name).write_bytes(_image_bytes(ref, sha))
        except (InputError, OSError) as e:  # bytes not kept or pruned, a file moved, refused
            skipped.append({"position": position, "ref": ref, "reason": str(e)})
            continue
        items.append({"position": position, "file": name, "label": label,
                      "confidence": confidence, "ref": ref, "sha256": sha})  # fmt: skip
    manifest = {
        "job_id": job_id,
        "exported_at": datetime.now(UTC).isoformat(),
        "threshold": threshold,
        "classes": classes,
        "items": items,
        "skipped": skipped,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("exported %d images of job %s to %s", len(items), job_id, out)
    return manifest


def _plain_name(name: str) -> bool:
    """Whether *name* can be one folder inside the export (no separator, no '..', no control)."""
    return bool(name) and name not in (".", "..") and "/" not in name and clean_text(name) == name


def _where(folder: Path) -> dict[str, list[Path]]:
    """Every file one level below *folder*, by name."""
    found: dict[str, list[Path]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in d.iterdir():
            if f.is_file():
                found.setdefault(f.name, []).append(f)
    return found


def import_review(
    folder: str | Path, *, add_to: str | Path | None = None, url: str | None = None
) -> dict:
    """Record the label of each exported image: the name of the folder it now lies in.

    With *add_to* (an ImageFolder training directory), also copy each reviewed image into
    *add_to*/<label>/. Returns counts and the images that could not be used.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ReviewError(
            f"{folder} has no {MANIFEST}; it is not a `sortline review export` folder"
        ) from None
    except json.JSONDecodeError as e:
        raise ReviewError(f"{folder / MANIFEST} is not valid JSON: {e}") from None
    classes = set(manifest.get("classes") or [])
    found = _where(folder)
    labels: dict[int, str] = {}
    files: dict[int, Path] = {}
    report = {"job_id": manifest["job_id"], "changed": [], "confirmed": 0, "missing": [],
              "unknown_folder": [], "ambiguous": [], "added": 0}  # fmt: skip
    for it in manifest.get("items", []):
        where = found.get(it["file"], [])
        if not where:
            report["missing"].append(it["file"])
            continue
        if len(where) > 1:
            report["ambiguous"].append(it["file"])
            continue
        label = where[0].parent.name
        if label not in classes:
            report["unknown_folder"].append(f"{label}/{it['file']}")
            continue
        labels[it["position"]] = label
        files[it["position"]] = where[0]
        if label == it["label"]:
            report["confirmed"] += 1
        else:
            report["changed"].append(
                {"position": it["position"], "file": it["file"], "from": it["label"], "to": label}
            )
    with session_scope(url) as session:
        job = get_job(session, job_id=manifest["job_id"])
        report["updated"] = set_corrected_labels(session, job_id=job.id, labels=labels)
    if add_to is not None:
        report["added"] = _add_to_training(files, labels, Path(add_to), job.id)
    log.info("review of job %s: %d changed, %d confirmed", job.id, len(report["changed"]),
             report["confirmed"])  # fmt: skip
    return report


def _add_to_training(files: dict[int, Path], labels: dict[int, str], root: Path, job: str) -> int:
    """Copy reviewed images into an ImageFolder tree; an identical file already there is kept."""
    added = 0
    for pos, src in files.items():
        name = f"review-{job[:8]}-{src.name}"
        dst = root / labels[pos] / name
        for stale in root.glob(f"*/{name}"):  # added before under another label
            if stale != dst:
                stale.unlink()
        if dst.exists() and _sha(dst) == _sha(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        added += 1
    return added


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
