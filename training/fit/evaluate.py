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
    calibrated,
    calibration,
    expected_calibration_error,
    softmax,
)
from training.model.preprocess import PreprocessSpec, preprocess
from training.reports.metrics import bootstrap_intervals, classification_metrics

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

    Runs on the device *model* is on. With *tta*, the logits of the image and its horizontal
    mirror are averaged.
    """
    model.eval()
    fn = transform or (lambda im: preprocess(im, spec))
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        batch = [
            im if isinstance(im, Image.Image) else Image.fromarray(im)
            for im in images[i : i + batch_size]
        ]
        x = torch.from_numpy(np.stack([fn(im) for im in batch])).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        if tta:
            logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(logits.cpu().numpy())
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


def score_splits(
    model: torch.nn.Module,
    images: dict,
    y: dict,
    spec: PreprocessSpec,
    classes: list[str],
    *,
    tta: bool = False,
    robustness: bool = True,
) -> dict:
    """Temperature fitted on val; val and test figures (test ECE calibrated); robustness on test.

    The one scoring of a model on its split, used by a training run and by ``sortline ship``.
    """
    val_logits = predict_logits(model, images["val"], spec)
    cal = calibration(val_logits, y["val"])
    test_logits = predict_logits(model, images["test"], spec)
    test_m = classification_metrics(y["test"], test_logits.argmax(1), classes)
    test_m["intervals"] = bootstrap_intervals(y["test"], test_logits.argmax(1), classes)
    test_m["ece"] = expected_calibration_error(softmax(test_logits, cal["temperature"]), y["test"])
    full = {
        "val": classification_metrics(y["val"], val_logits.argmax(1), classes),
        "test": test_m,
        "calibration": cal,
    }
    if tta:
        tl = predict_logits(model, images["test"], spec, tta=True)
        full["test_flip_tta"] = classification_metrics(y["test"], tl.argmax(1), classes)
    if robustness:
        from training.fit.robustness import robustness_report

        full["test_robustness"] = robustness_report(model, images["test"], y["test"], spec)
    return full


# ---------------------------------------------------------------- with a checkpoint


def _load(checkpoint: str | Path):
    from training.model.checkpoint import preprocess_spec
    from training.model.scored import scored

    model, meta = scored(checkpoint)  # with the unfamiliarity score when the checkpoint has it
    model = model.to(memory_format=torch.channels_last)
    return model, meta, preprocess_spec(meta)


@torch.no_grad()
def _predict(model, images: Sequence[Image.Image], spec: PreprocessSpec):
    """Logits and unfamiliarity scores (None without statistics) of PIL images."""
    from training.model.scored import ScoredModel

    if not isinstance(model, ScoredModel):
        return predict_logits(model, images, spec), None
    logits, scores = [], []
    for i in range(0, len(images), 64):
        x = torch.from_numpy(np.stack([preprocess(im, spec) for im in images[i : i + 64]]))
        lg, sc = model(x.contiguous(memory_format=torch.channels_last))
        logits.append(lg.numpy())
        scores.append(sc.numpy())
    return np.concatenate(logits), np.concatenate(scores)


def _probabilities(
    checkpoint, images: list[Image.Image], predict: Predict | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Calibrated probabilities and unfamiliarity scores (None without statistics) of *images*.

    By *predict* (a worker classifier's: probabilities, then the score as a last column), or
    by PyTorch in process.
    """
    if predict is None:
        model, meta, spec = _load(checkpoint)
        logits, scores = _predict(model, images, spec)
        return calibrated(logits, scores, meta), scores
    meta, spec = _meta(checkpoint)
    nc = len(meta["classes"])
    chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
    out = np.concatenate([predict(np.stack([preprocess(im, spec) for im in c])) for c in chunks])
    scores = out[:, nc].astype(np.float64)
    return out[:, :nc], (None if np.isnan(scores).all() else scores)


def _meta(checkpoint):
    from training.model.checkpoint import preprocess_spec, read_metadata

    meta = read_metadata(checkpoint)
    return meta, preprocess_spec(meta)


def unfamiliar_threshold(meta: dict, override: float | None = None) -> float | None:
    """The threshold above which an image is unfamiliar: *override*, else the checkpoint's."""
    return override if override is not None else (meta.get("unfamiliarity") or {}).get("threshold")


def review_figures(
    probs: np.ndarray, y: Sequence[int], scores: np.ndarray | None, *, review: float, thr
) -> dict:
    """Shares flagged for review (low confidence or unfamiliar) and of confident errors."""
    conf, wrong = probs.max(1), probs.argmax(1) != np.asarray(y)
    unfamiliar = (scores > thr) if scores is not None and thr is not None else np.zeros_like(wrong)
    flagged = (conf < review) | unfamiliar
    return {
        "review_threshold": review,
        "unfamiliar_threshold": thr,
        "unfamiliar_rate": float(unfamiliar.mean()),
        "needs_review_rate": float(flagged.mean()),
        "confident_error_rate": float((wrong & ~flagged).mean()),
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    review_threshold: float = 0.6,
    unfamiliar_override: float | None = None,
    predict: Predict | None = None,
) -> dict:
    """Score a checkpoint on every readable image of a labelled ImageFolder directory.

    The figures come with bootstrap 95% intervals (``intervals``). Class folders must be a
    subset of the checkpoint's classes. Images are decoded and preprocessed exactly as the
    worker does; with *predict* (a worker classifier's ``predict``), they are also classified
    by the worker's runtime and precision. Besides accuracy and ECE: the shares flagged for
    review and the confident-error rate (wrong and not flagged) at *review_threshold*.
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
    probs, scores = _probabilities(checkpoint, images, predict)
    y = [classes.index(s.label) for s in ds.samples]
    m = classification_metrics(y, probs.argmax(1).tolist(), classes)
    m["intervals"] = bootstrap_intervals(y, probs.argmax(1), classes)
    m["ece"] = expected_calibration_error(probs, y)
    thr = unfamiliar_threshold(meta, unfamiliar_override)
    m.update(review_figures(probs, y, scores, review=review_threshold, thr=thr))
    m["skipped"] = [{"file": f, "reason": r} for f, r in ds.skipped]
    m["model"] = f"{meta.get('name')}:{meta.get('version')}"
    return m


def predict_files(
    paths: Sequence[str | Path],
    checkpoint: str | Path,
    *,
    review_threshold: float = 0.6,
    unfamiliar_override: float | None = None,
    predict: Predict | None = None,
) -> list[dict]:
    """Label, calibrated confidence, unfamiliarity and needs_review for each image file."""
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
    thr = unfamiliar_threshold(meta, unfamiliar_override)
    if images:
        probs, scores = _probabilities(checkpoint, images, predict)
        for j, (i, pr) in enumerate(zip(ok, probs, strict=True)):
            k = int(pr.argmax())
            score = float(scores[j]) if scores is not None else None
            unfamiliar = score is not None and thr is not None and score > thr
            out[i].update(
                label=classes[k],
                confidence=float(pr[k]),
                unfamiliarity=score,
                unfamiliar=unfamiliar,
                needs_review=bool(pr[k] < review_threshold or unfamiliar),
                probabilities={c: float(v) for c, v in zip(classes, pr, strict=True)},
                image=images[ok.index(i)],
            )
    return out


def save_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))
