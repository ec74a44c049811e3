"""Calibration of a checkpoint's confidence: softmax with a temperature fitted on val.

NumPy only (SciPy for the fit), so the ONNX worker uses the same softmax as training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray, temperature: float | np.ndarray = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (one temperature, or one per row)."""
    t = np.asarray(temperature, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64) / (t[:, None] if t.ndim else t)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float | np.ndarray = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: Sequence[int] | np.ndarray) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(y)
    res = minimize_scalar(
        lambda t: nll(logits, labels, math.exp(t)), bounds=(-3, 3), method="bounded"
    )
    return float(math.exp(res.x))


def expected_calibration_error(
    probs: np.ndarray, y: Sequence[int] | np.ndarray, n_bins: int = 15
) -> float:
    """ECE of the top-1 confidence over equal-width bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def calibration(val_logits: np.ndarray, y_val: Sequence[int] | np.ndarray) -> dict:
    """Temperature fitted on validation, with ECE and NLL before and after."""
    y = np.asarray(y_val)
    t = fit_temperature(val_logits, y)
    return {
        "split": "val",
        "temperature": t,
        "ece_before": expected_calibration_error(softmax(val_logits), y),
        "ece_after": expected_calibration_error(softmax(val_logits, t), y),
        "nll_before": nll(val_logits, y),
        "nll_after": nll(val_logits, y, t),
    }


def temperatures(
    scores: np.ndarray | None, temperature: float, shift_slope: float = 0.0
) -> float | np.ndarray:
    """Per-image temperatures: ``T * (1 + slope * max(0, score))``.

    *scores* are unfamiliarity scores on the scale of :mod:`training.model.unfamiliarity`
    (0 at the val median, 1 at the threshold), so a typical val photo keeps the val
    temperature and a photo unlike the training photos gets a softer softmax. Without scores
    (or a slope) every image gets *temperature*; a NaN score counts as 0.
    """
    if scores is None or not shift_slope:
        return temperature
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
    return temperature * (1 + shift_slope * np.maximum(0.0, s))


def calibrated(logits: np.ndarray, scores: np.ndarray | None, meta: dict) -> np.ndarray:
    """A checkpoint's calibrated probabilities: its temperature, softened under shift."""
    slope = float((meta.get("unfamiliarity") or {}).get("shift_slope", 0.0))
    return softmax(logits, temperatures(scores, float(meta.get("temperature", 1.0)), slope))


def fit_shift_slope(
    logits: np.ndarray, y: np.ndarray, scores: np.ndarray, temperature: float
) -> float:
    """The slope in [0, 5] minimising the NLL of :func:`temperatures` on (shifted) val."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda b: nll(logits, y, temperatures(scores, temperature, b)),
        bounds=(0.0, 5.0),
        method="bounded",
    )
    return float(res.x)
