"""The one JSON shape of an image's result, shared by `predict --json` and `results --format json`."""

from __future__ import annotations

from typing import Any


def image_record(
    ref: str,
    *,
    label: str | None = None,
    confidence: float | None = None,
    probabilities: dict[str, float] | None = None,
    unfamiliarity: float | None = None,
    unfamiliar: bool | None = None,
    needs_review: bool | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An image's result: ``ref``, ``status`` (ok or error), label, confidence, probabilities,
    unfamiliarity, unfamiliar, needs_review, error, then the context's own fields (a job's
    position, corrected label, worker, ...)."""
    return {
        "ref": ref,
        "status": "error" if error else "ok",
        "label": label,
        "confidence": confidence,
        "probabilities": probabilities,
        "unfamiliarity": unfamiliarity,
        "unfamiliar": unfamiliar,
        "needs_review": needs_review,
        "error": error,
        **extra,
    }
