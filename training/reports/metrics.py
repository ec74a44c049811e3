"""Classification metrics and their bootstrap intervals, without torch: shared by `sortline
evaluate`, training, the model card and job reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: list[str]
) -> dict:
    """n, accuracy, macro-F1 and per-class precision/recall/F1/support, plus the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def bootstrap_intervals(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    classes: list[str],
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap intervals of accuracy, macro-F1 and each class's F1.

    The images are resampled with replacement *resamples* times (seeded, so the same
    predictions always give the same intervals). Macro-F1 averages the classes present in a
    resample, as :func:`classification_metrics` does.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n, k = len(y_true), len(classes)
    if n == 0:
        raise ValueError("bootstrap intervals need at least one prediction")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    t, p = y_true[idx], y_pred[idx]
    acc = (t == p).mean(axis=1)
    f1 = np.zeros((resamples, k))
    present = np.zeros((resamples, k), dtype=bool)
    for c in range(k):
        is_t, is_p = t == c, p == c
        tp = (is_t & is_p).sum(axis=1)
        denom = is_t.sum(axis=1) + is_p.sum(axis=1)  # 2tp + fp + fn
        f1[:, c] = np.divide(2 * tp, denom, out=np.zeros(resamples), where=denom > 0)
        present[:, c] = is_t.any(axis=1)
    macro = np.where(present, f1, 0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(values: np.ndarray) -> list[float]:
        lo, hi = np.percentile(values, q)
        return [round(float(lo), 4), round(float(hi), 4)]

    return {
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "accuracy": interval(acc),
        "macro_f1": interval(macro),
        "per_class_f1": {c: interval(f1[:, i]) for i, c in enumerate(classes)},
    }


def with_interval(value: float, interval: Sequence[float]) -> str:
    """A figure and its interval as the model card writes them: ``0.941 [0.915, 0.966]``."""
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
