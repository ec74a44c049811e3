"""How far an image's pooled features lie from the training images: a Mahalanobis score.

Class-conditional Gaussians with one shared covariance are fitted on the training split's
pooled penultimate features; an image's score is its smallest squared Mahalanobis distance
to a class mean, computed as the distance of whitened features (``features @ whiten``) to
whitened class means. The flagging threshold is the score of the val split's 95th
percentile, so about 5% of val images are called unfamiliar. NumPy only: the ONNX worker
uses it after the forward pass, and it is also built into the exported graph.
"""

from __future__ import annotations

import numpy as np

PREFIX = "unfamiliarity."  # tensors of the statistics inside a checkpoint
VAL_FLAGGED = 0.05  # share of val images above the threshold


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    *,
    flagged: float = VAL_FLAGGED,
    shrinkage: float = 1e-3,
) -> tuple[dict[str, np.ndarray], float]:
    """Statistics (whitening matrix, whitened class means) and the val-fitted threshold."""
    train_x = np.asarray(train_x, np.float64)
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    centred = train_x - means[np.searchsorted(classes, train_y)]
    cov = centred.T @ centred / max(1, len(train_x) - len(classes))
    cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))  # well-conditioned
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(vals)  # x @ whiten has identity covariance
    stats = {
        "whiten": whiten.astype(np.float32),
        "means": (means @ whiten).astype(np.float32),
    }
    threshold = float(np.quantile(score(val_x, stats), 1 - flagged))
    return stats, threshold


def score(x: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Smallest squared Mahalanobis distance of each row of *x* to a class mean."""
    z = np.asarray(x, np.float32) @ stats["whiten"]
    mu = stats["means"]
    d = (z * z).sum(1, keepdims=True) - 2 * z @ mu.T + (mu * mu).sum(1)[None, :]
    return d.min(1)
