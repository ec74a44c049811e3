"""The report of a job: label distribution, confidence, review gallery, errors, and accuracy
against class-named folders. Reads the database only (no model, no torch).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from db.engine import session_scope
from db.service import get_job, label_counts, list_results
from db.text import clean_text
from training.reports import charts as viz
from training.reports.metrics import classification_metrics

log = logging.getLogger(__name__)

GALLERY_SIZE = 24


def folder_label(ref: str, classes: Sequence[str]) -> str | None:
    """The class named by the parent folder of *ref* (a submitted path), if it is one."""
    parent = PurePath(ref).parent.name
    return parent if parent in classes else None


def labelled_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    """The metrics `sortline evaluate` prints, for class names instead of indices."""
    idx = {c: i for i, c in enumerate(classes)}
    return classification_metrics([idx[c] for c in y_true], [idx[c] for c in y_pred], list(classes))


def _review_threshold() -> float | None:
    try:
        from worker.config import get_worker_settings

        return get_worker_settings().review_threshold
    except Exception:  # settings that do not parse must not stop a report
        return None


def collect(job_id: str, *, url: str | None = None) -> dict:
    """Everything the report shows, as plain data (also written as report.json)."""
    with session_scope(url) as session:
        job = get_job(session, job_id=job_id)
        results = list_results(session, job_id=job.id)
        counts = label_counts(session, job_id=job.id)
        rows: list[dict[str, Any]] = [
            {
                "position": r.position, "ref": r.ref, "status": r.status, "label": r.label,
                "confidence": r.confidence, "probs": r.probs, "error": r.error,
                "needs_review": r.needs_review, "corrected_label": r.corrected_label,
                "unfamiliar": bool(r.unfamiliar),
            }
            for r in results
        ]  # fmt: skip
        info = {
            "job_id": job.id, "status": job.status, "kind": job.kind, "source": job.source,
            "model_version": job.model_version, "total": job.total, "done": job.done,
            "failed": job.failed,
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        }  # fmt: skip
    ok = [r for r in rows if r["status"] == "ok"]
    # sorted, as ImageFolder (and so training) orders them; PostgreSQL's JSONB does not keep
    # the key order of the probabilities
    classes = sorted(
        set(next((r["probs"] for r in ok if r["probs"]), None) or {}) | {r["label"] for r in ok}
    )
    conf = [r["confidence"] for r in ok if r["confidence"] is not None]
    report = {
        "job": info,
        "classes": classes,
        "labels": counts,
        "model_labels": dict(Counter(r["label"] for r in ok).most_common()),
        "n_results": len(rows),
        "n_ok": len(ok),
        "n_errors": len(rows) - len(ok),
        "needs_review": sum(1 for r in ok if r["needs_review"]),
        "unfamiliar": sum(1 for r in ok if r["unfamiliar"]),
        "corrected": sum(1 for r in ok if r["corrected_label"]),
        "review_threshold": _review_threshold(),
        "confidence": {
            "mean": float(np.mean(conf)) if conf else None,
            "median": float(np.median(conf)) if conf else None,
            "min": float(min(conf)) if conf else None,
        },
        "errors": [
            {"position": r["position"], "ref": r["ref"], "error": r["error"]}
            for r in rows
            if r["status"] != "ok"
        ],
        "lowest_confidence": [
            {k: r[k] for k in ("position", "ref", "label", "confidence", "corrected_label")}
            for r in sorted(ok, key=lambda r: (r["confidence"], r["position"]))[:GALLERY_SIZE]
        ],
    }
    truth = [(r, folder_label(r["ref"], classes)) for r in ok]
    labelled = [(r, t) for r, t in truth if t is not None]
    if labelled:
        m = labelled_metrics([t for _, t in labelled], [r["label"] for r, _ in labelled], classes)
        m["unlabelled"] = len(ok) - len(labelled)
        m["errors_excluded"] = report["n_errors"]
        report["labelled"] = m
    report["_confidences"] = conf
    return report


def _thumb(ref: str, size: int = 200):
    """A thumbnail of the file a row names, read as a worker would read it, else None."""
    from training.model.imaging import ImageError, decode_image
    from worker.inputs import InputError, read_stored_ref

    try:
        return viz.thumbnail(decode_image(read_stored_ref(ref), draft=(size, size)), size)
    except (ImageError, InputError) as e:
        log.info("no thumbnail for %s: %s", ref, e)
        return None


def job_report(job_id: str, out: str | Path, *, url: str | None = None) -> dict:
    """Write ``report.html``, ``report.json`` and PNG charts of a job into *out*; return the data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = collect(job_id, url=url)
    conf = rep.pop("_confidences")
    ch: dict[str, Path] = {}
    labels = {k: v for k, v in rep["labels"].items() if k != "error"}
    ch["labels"] = viz.bar_chart(
        labels or {"(none)": 0}, out / "labels.png", title="images per label", ylabel="images"
    )
    ch["confidence"] = viz.histogram(
        conf, out / "confidence.png", title="confidence of the predicted label",
        xlabel="confidence", bins=list(np.linspace(0, 1, 21)), vline=rep["review_threshold"],
    )  # fmt: skip
    low = rep["lowest_confidence"]
    if low:
        items = [
            (
                _thumb(r["ref"]),
                f"{r['label']} {r['confidence']:.2f}\n{clean_text(PurePath(r['ref']).name)[:28]}",
            )
            for r in low
        ]
        ch["lowest"] = viz.gallery(items, out / "lowest_confidence.png", cols=6)
    m = rep.get("labelled")
    if m:
        ch["confusion"] = viz.confusion_png(
            m["confusion"], rep["classes"], out / "confusion_matrix.png",
            title=f"job against folder names (accuracy {m['accuracy']:.3f})",
        )  # fmt: skip
    rep["charts"] = {k: p.name for k, p in ch.items()}
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    _page(rep, ch).write(out / "report.html")
    return rep


def _page(rep: dict, ch: dict[str, Path]) -> viz.Page:
    j = rep["job"]
    page = viz.Page(f"Job {j['job_id'][:12]}", clean_text(j["source"])[:120])
    page.table(
        ["job", "status", "model", "images", "labelled", "errors", "needs review", "corrected"],
        [(j["job_id"], j["status"], j["model_version"], j["total"], rep["n_ok"],
          rep["n_errors"], rep["needs_review"], rep["corrected"])],
        left=3,
    )  # fmt: skip
    if j["status"] != "done":
        page.p(f"The job is {j['status']}: {rep['n_results']} of {j['total']} images have a "
               "result so far.", "warn")  # fmt: skip

    page.h2("Label distribution")
    total = max(1, rep["n_results"])
    page.table(
        ["label", "images", "share"],
        [(k, v, f"{v / total:.1%}") for k, v in rep["labels"].items()],
    )
    if rep["corrected"]:
        page.p("Labels include the corrections recorded by `sortline review import`.")
    page.figure(ch["labels"], "images per label")

    page.h2("Confidence")
    c = rep["confidence"]
    thr = rep["review_threshold"]
    page.p(f"mean {viz.fmt(c['mean'])}, median {viz.fmt(c['median'])}, lowest {viz.fmt(c['min'])}"
           + f"; {rep['needs_review']} images marked for review"
           + (f" (confidence below {thr:g} when classified" if thr is not None else " (")
           + f"; {rep['unfamiliar']} unlike the training photos)")  # fmt: skip
    page.figure(ch["confidence"], "confidence histogram (dashed: review threshold)")

    m = rep.get("labelled")
    if m:
        page.h2("Accuracy against the folder names")
        page.p(f"{m['n']} images lie in folders named after a class; {m['unlabelled']} do not "
               f"and {m['errors_excluded']} failed, and are left out.")  # fmt: skip
        page.table(["n", "accuracy", "macro-F1"], [(m["n"], m["accuracy"], m["macro_f1"])], left=0)
        page.table(
            ["class", "precision", "recall", "f1", "support"],
            [(k, v["precision"], v["recall"], v["f1"], v["support"])
             for k, v in m["per_class"].items()],
        )  # fmt: skip
        page.figure(ch["confusion"], "confusion matrix: rows folder name, columns prediction")

    page.h2("Lowest confidence (for review)")
    if "lowest" in ch:
        page.table(
            ["file", "label", "confidence", "corrected", "position"],
            [(clean_text(r["ref"]), r["label"], r["confidence"], r["corrected_label"],
              r["position"]) for r in rep["lowest_confidence"]],
            left=2,
        )  # fmt: skip
        page.figure(ch["lowest"], "lowest-confidence images with their predicted label")
    else:
        page.p("No labelled image.")

    page.h2("Errors")
    if rep["errors"]:
        page.table(
            ["position", "file", "error"],
            [(e["position"], clean_text(e["ref"]), clean_text(e["error"])) for e in rep["errors"]],
            left=3,
        )
    else:
        page.p("No image failed.", "ok")
    return page
