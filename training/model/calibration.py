"""Calibration of a checkpoint's confidence: softmax with a temperature fitted on val.

NumPy only (SciPy for the fit), so the ONNX worker uses the same softmax as training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
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
