"""How far an image's pooled features lie from the training photos: the unfamiliarity score.

Two parts, both on the pooled penultimate features, both computed in the forward pass:

* **Mahalanobis** (new kinds of object): class-conditional Gaussians with one shared
  covariance fitted on the training split; the smallest squared Mahalanobis distance to a class
  mean, computed as the distance of whitened features (``features @ whiten``) to whitened means.
* **Shift detector** (familiar objects photographed differently: other floors, lighting, framing,
  compression): a logistic regression told apart the training photos from the same photos
  under the fitting corruptions of :mod:`training.fit.robustness` (``SHIFT_FIT``); its logit.

With both, each part is rescaled to 0 at its val median and 1 at a shared val quantile chosen
so that the larger of the two exceeds 1 on about 5% of val images; the score is that larger
value and the threshold is 1.0. A checkpoint with the Mahalanobis part only (older ones,
``method: mahalanobis``) scores the raw distance against a val-fitted threshold. NumPy at
scoring time: the ONNX worker reads the score from the exported graph, the same formula.
"""

from __future__ import annotations

import numpy as np

PREFIX = "unfamiliarity."  # tensors of the statistics inside a checkpoint
VAL_FLAGGED = 0.05  # share of val images above the threshold
# L2 strength of the shift detector, as scikit-learn's C (chosen from 0.01, 0.1 and 1 by the
# val AUROC of clean val photos against val photos under the fitting corruptions: 0.751,
# 0.722, 0.691 on sortline-trashnet 1.1.0's features)
DETECTOR_C = 0.01


def mahalanobis(x: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Smallest squared Mahalanobis distance of each row of *x* to a class mean."""
    z = np.asarray(x, np.float32) @ stats["whiten"]
    mu = stats["means"]
    d = (z * z).sum(1, keepdims=True) - 2 * z @ mu.T + (mu * mu).sum(1)[None, :]
    return d.min(1)


def detector_logit(x: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """The shift detector's logit (higher: more like the corrupted photos)."""
    return np.asarray(x, np.float32) @ stats["det_w"] + stats["det_b"][0]


def score(x: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's unfamiliarity score (see the module's docstring for its scale)."""
    m = mahalanobis(x, stats)
    if "det_w" not in stats:
        return m
    m_med, m_scale, d_med, d_scale = (float(v) for v in stats["norm"])
    d = detector_logit(x, stats)
    return np.maximum((m - m_med) / m_scale, (d - d_med) / d_scale)


def fit_gaussians(
    train_x: np.ndarray, train_y: np.ndarray, shrinkage: float = 1e-3
) -> dict[str, np.ndarray]:
    """Whitening matrix and whitened class means of the training features."""
    train_x = np.asarray(train_x, np.float64)
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == c].mean(0) for c in classes])
    centred = train_x - means[np.searchsorted(classes, train_y)]
    cov = centred.T @ centred / max(1, len(train_x) - len(classes))
    cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))  # well-conditioned
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs / np.sqrt(vals)  # x @ whiten has identity covariance
    return {"whiten": whiten.astype(np.float32), "means": (means @ whiten).astype(np.float32)}


def fit_detector(
    clean_x: np.ndarray, shifted_x: np.ndarray, *, c: float = DETECTOR_C
) -> dict[str, np.ndarray]:
    """L2-regularised logistic regression, clean (0) against shifted (1) features.

    The features are standardised for the fit and the standardisation is folded into the
    weights, so the detector is one dot product on raw pooled features.
    """
    import torch

    x = np.concatenate([clean_x, shifted_x]).astype(np.float64)
    y = np.r_[np.zeros(len(clean_x)), np.ones(len(shifted_x))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def closure() -> torch.Tensor:  # scikit-learn's objective, divided by C * n
        opt.zero_grad()
        loss = bce(xt @ w + b, yt) + (w @ w) / (2 * c * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = w.detach().numpy() / sd
    b_raw = float(b.detach()) - float(mu @ w_raw)
    return {"det_w": w_raw.astype(np.float32), "det_b": np.array([b_raw], np.float32)}


def _normalise(
    stats: dict[str, np.ndarray], val_x: np.ndarray, flagged: float
) -> dict[str, np.ndarray]:
    """Rescale both parts so that max(part) > 1 flags about *flagged* of val."""
    m, d = mahalanobis(val_x, stats), detector_logit(val_x, stats)
    m_med, d_med = float(np.median(m)), float(np.median(d))
    for q in np.arange(1 - flagged, 1.0, 0.0005):
        m_thr, d_thr = float(np.quantile(m, q)), float(np.quantile(d, q))
        if ((m > m_thr) | (d > d_thr)).mean() <= flagged:
            break
    norm = [m_med, max(m_thr - m_med, 1e-6), d_med, max(d_thr - d_med, 1e-6)]
    return {**stats, "norm": np.array(norm, np.float32)}


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    *,
    shifted_x: np.ndarray | None = None,
    detector: dict[str, np.ndarray] | None = None,
    flagged: float = VAL_FLAGGED,
) -> tuple[dict[str, np.ndarray], float]:
    """Statistics and the threshold above which an image is unfamiliar (about *flagged* of val).

    *shifted_x* (features of corrupted training photos) fits a new shift detector; *detector*
    (``det_w``, ``det_b`` of an earlier fit on the same backbone) reuses one. With neither,
    the score is the Mahalanobis part alone.
    """
    stats = fit_gaussians(train_x, train_y)
    if shifted_x is not None:
        detector = fit_detector(train_x, shifted_x)
    if detector is None:
        return stats, float(np.quantile(mahalanobis(val_x, stats), 1 - flagged))
    stats.update({k: detector[k] for k in ("det_w", "det_b")})
    return _normalise(stats, val_x, flagged), 1.0


def method(stats: dict[str, np.ndarray]) -> str:
    """How *stats* score, as recorded in a checkpoint's metadata."""
    return "mahalanobis+shift-detector" if "det_w" in stats else "mahalanobis"
