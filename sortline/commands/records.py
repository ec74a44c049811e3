"""The one JSON shape of an image's result, shared by `predict --json` and `results --format json`."""

from __future__ import annotations

from typing import Any


def image_record(
    ref: str,
    *,
    label: str | None = None,
    confidence: float | None = None,
    probabilities: dict[str, float] | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An image's result: ``ref``, ``status`` (ok or error), label, confidence, probabilities,
    error, then any fields of the context (a job's position, needs_review, ...)."""
    return {
        "ref": ref,
        "status": "error" if error else "ok",
        "label": label,
        "confidence": confidence,
        "probabilities": probabilities,
        "error": error,
        **extra,
    }
