"""Metrics, calibration, plots, and evaluation/prediction with a saved checkpoint."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.model.preprocess import PreprocessSpec, preprocess
from training.reports.metrics import classification_metrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- inference


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: Sequence[np.ndarray | Image.Image],
    spec: PreprocessSpec,
    *,
    tta: bool = False,
    batch_size: int = 64,
    transform=None,
) -> np.ndarray:
    """Logits (N, C) for uint8 HWC arrays or PIL images through the eval transform.

    With *tta*, the logits of the image and its horizontal mirror are averaged.
    """
    model.eval()
    fn = transform or (lambda im: preprocess(im, spec))
    out = []
    for i in range(0, len(images), batch_size):
        batch = [
            im if isinstance(im, Image.Image) else Image.fromarray(im)
            for im in images[i : i + batch_size]
        ]
        x = torch.from_numpy(np.stack([fn(im) for im in batch]))
        x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        if tta:
            logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(logits.numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- metrics


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y: Sequence[int]) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y)
    res = minimize_scalar(lambda t: nll(logits, y, math.exp(t)), bounds=(-3, 3), method="bounded")
    return float(math.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y: Sequence[int], n_bins: int = 15) -> float:
    """ECE of the top-1 confidence over equal-width bins."""
    y = np.asarray(y)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def calibration(val_logits: np.ndarray, y_val: Sequence[int]) -> dict:
    """Temperature fitted on validation, with ECE and NLL before and after."""
    y_val = np.asarray(y_val)
    t = fit_temperature(val_logits, y_val)
    return {
        "split": "val",
        "temperature": t,
        "ece_before": expected_calibration_error(softmax(val_logits), y_val),
        "ece_after": expected_calibration_error(softmax(val_logits, t), y_val),
        "nll_before": nll(val_logits, y_val),
        "nll_after": nll(val_logits, y_val, t),
    }


def report_text(metrics: dict, classes: list[str]) -> str:
    """A per-class classification report in the usual layout."""
    lines = [f"{'':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for c in classes:
        m = metrics["per_class"][c]
        lines.append(
            f"{c:>12} {m['precision']:9.3f} {m['recall']:9.3f} {m['f1']:9.3f} {m['support']:8d}"
        )
    lines.append(f"{'accuracy':>12} {'':>9} {'':>9} {metrics['accuracy']:9.3f} {metrics['n']:8d}")
    lines.append(f"{'macro f1':>12} {'':>9} {'':>9} {metrics['macro_f1']:9.3f} {metrics['n']:8d}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    confusion: list[list[int]], classes: list[str], path: str | Path, title: str = ""
) -> None:
    """The confusion matrix as a PNG (the same chart as the HTML reports)."""
    from training.reports.charts import confusion_png

    confusion_png(confusion, classes, path, title=title or "confusion matrix")


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Train/val loss and val accuracy/macro-F1 per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], label="val loss")
    a1.set_xlabel("epoch")
    a1.legend()
    a2.plot(ep, [h.get("train_acc", float("nan")) for h in history], label="train accuracy")
    a2.plot(ep, [h["val_acc"] for h in history], label="val accuracy")
    a2.plot(ep, [h["val_macro_f1"] for h in history], label="val macro-F1")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(items: list[tuple[Image.Image, str]], path: str | Path, cols: int = 4) -> None:
    """A gallery of photos, each titled (label and confidence)."""
    plt = _plt()
    n = max(1, len(items))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), items, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- with a checkpoint


def _load(checkpoint: str | Path):
    from training.model.checkpoint import load_checkpoint, preprocess_spec

    model, meta = load_checkpoint(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    return model, meta, preprocess_spec(meta)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path) -> dict:
    """Score a checkpoint on every readable image of a labelled ImageFolder directory.

    Class folders must be a subset of the checkpoint's classes. Images are decoded and
    preprocessed exactly as the worker does.
    """
    from training.data.dataset import DatasetError, scan_imagefolder
    from training.model.imaging import decode_image

    model, meta, spec = _load(checkpoint)
    classes = meta["classes"]
    ds = scan_imagefolder(data)
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise DatasetError(
            f"class folders {', '.join(unknown)} are not classes of this model ({', '.join(classes)})"
        )
    images = [
        decode_image((ds.root / s.file).read_bytes(), draft=(spec.resize, spec.resize))
        for s in ds.samples
    ]
    logits = predict_logits(model, images, spec)
    y = [classes.index(s.label) for s in ds.samples]
    m = classification_metrics(y, logits.argmax(1).tolist(), classes)
    probs = softmax(logits, float(meta.get("temperature", 1.0)))
    m["ece"] = expected_calibration_error(probs, y)
    m["skipped"] = [{"file": f, "reason": r} for f, r in ds.skipped]
    m["model"] = f"{meta.get('name')}:{meta.get('version')}"
    return m


def predict_files(paths: Sequence[str | Path], checkpoint: str | Path) -> list[dict]:
    """Label and calibrated confidence (softmax at the stored temperature) for each image file."""
    from training.model.imaging import ImageError, decode_image

    model, meta, spec = _load(checkpoint)
    classes, t = meta["classes"], float(meta.get("temperature", 1.0))
    out, images, ok = [], [], []
    for p in paths:
        try:
            images.append(decode_image(Path(p).read_bytes(), draft=(spec.resize, spec.resize)))
            ok.append(len(out))
            out.append({"file": str(p)})
        except (ImageError, OSError) as e:
            out.append({"file": str(p), "error": str(e)})
    if images:
        probs = softmax(predict_logits(model, images, spec), t)
        for i, pr in zip(ok, probs, strict=True):
            k = int(pr.argmax())
            out[i].update(
                label=classes[k],
                confidence=float(pr[k]),
                probabilities={c: float(v) for c, v in zip(classes, pr, strict=True)},
                image=images[ok.index(i)],
            )
    return out


def save_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))
