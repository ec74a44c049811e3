"""Inference for evaluation, the classification report, and evaluation/prediction with a checkpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.model.calibration import (
    expected_calibration_error,
    softmax,
)
from training.model.preprocess import PreprocessSpec, preprocess
from training.reports.metrics import classification_metrics

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]  # preprocessed arrays -> calibrated probabilities


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


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- with a checkpoint


def _load(checkpoint: str | Path):
    from training.model.checkpoint import load_checkpoint, preprocess_spec

    model, meta = load_checkpoint(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    return model, meta, preprocess_spec(meta)


def _probabilities(checkpoint, images: list[Image.Image], predict: Predict | None) -> np.ndarray:
    """Calibrated probabilities of *images*: by *predict* (a worker's classifier) or PyTorch."""
    if predict is None:
        model, meta, spec = _load(checkpoint)
        return softmax(predict_logits(model, images, spec), float(meta.get("temperature", 1.0)))
    _, spec = _meta(checkpoint)
    chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
    return np.concatenate([predict(np.stack([preprocess(im, spec) for im in c])) for c in chunks])


def _meta(checkpoint):
    from training.model.checkpoint import preprocess_spec, read_metadata

    meta = read_metadata(checkpoint)
    return meta, preprocess_spec(meta)


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, *, predict: Predict | None = None
) -> dict:
    """Score a checkpoint on every readable image of a labelled ImageFolder directory.

    Class folders must be a subset of the checkpoint's classes. Images are decoded and
    preprocessed exactly as the worker does; with *predict* (a worker classifier's
    ``predict``), they are also classified by the worker's runtime and precision.
    """
    from training.data.dataset import DatasetError, scan_imagefolder
    from training.model.imaging import decode_image

    meta, spec = _meta(checkpoint)
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
    probs = _probabilities(checkpoint, images, predict)
    y = [classes.index(s.label) for s in ds.samples]
    m = classification_metrics(y, probs.argmax(1).tolist(), classes)
    m["ece"] = expected_calibration_error(probs, y)
    m["skipped"] = [{"file": f, "reason": r} for f, r in ds.skipped]
    m["model"] = f"{meta.get('name')}:{meta.get('version')}"
    return m


def predict_files(
    paths: Sequence[str | Path], checkpoint: str | Path, *, predict: Predict | None = None
) -> list[dict]:
    """Label and calibrated confidence (softmax at the stored temperature) for each image file."""
    from training.model.imaging import ImageError, decode_image

    meta, spec = _meta(checkpoint)
    classes = meta["classes"]
    out, images, ok = [], [], []
    for p in paths:
        try:
            images.append(decode_image(Path(p).read_bytes(), draft=(spec.resize, spec.resize)))
            ok.append(len(out))
            out.append({"file": str(p)})
        except (ImageError, OSError) as e:
            out.append({"file": str(p), "error": str(e)})
    if images:
        probs = _probabilities(checkpoint, images, predict)
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
