"""Which timm variant and normalisation fit the offline EfficientNet-Lite weights best.

Run: ``sortline probe --data /work/shared/trashnet [--arch efficientnet_lite2]``
(each at its own input size; a logistic-regression probe on
pooled features; fitted on the train split, scored on the val split, the test split unused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import timm
import torch

from training.data.dataset import load_resized, load_split
from training.data.features import extract
from training.model.factory import (
    ARCHS,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _load_by_position,
    _offline_state,
)
from training.model.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


def probe(
    data: str,
    arch: str = "efficientnet_lite0",
    cache_dir: str = "cache",
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit a probe for each (variant, normalisation); return val accuracy and macro-F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    ds = load_split(data)
    tr, va = ds.split("train"), ds.split("val")
    info = ARCHS[arch]
    imgs_tr = load_resized(ds, tr, short_side=info.resize, cache_dir=cache_dir)
    imgs_va = load_resized(ds, va, short_side=info.resize, cache_dir=cache_dir)
    y_tr = np.array([ds.label_index(s) for s in tr])
    y_va = np.array([ds.label_index(s) for s in va])
    rows = []
    weights = _offline_state(arch)
    for variant in (f"tf_{arch}", arch):
        model = timm.create_model(variant, pretrained=False, num_classes=1000)
        _load_by_position(model, weights)
        model = model.to(memory_format=torch.channels_last).eval()
        for norm, (mean, std) in {
            "half": (HALF, HALF),
            "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        }.items():
            spec = PreprocessSpec(resize=info.resize, crop=info.crop, mean=mean, std=std)
            t = time.time()
            f_tr, f_va = extract(model, imgs_tr, spec), extract(model, imgs_va, spec)
            clf = LogisticRegression(max_iter=3000, C=1.0).fit(f_tr, y_tr)
            p = clf.predict(f_va)
            row = {
                "variant": variant,
                "norm": norm,
                "val_accuracy": round(float(accuracy_score(y_va, p)), 4),
                "val_macro_f1": round(float(f1_score(y_va, p, average="macro")), 4),
                "seconds": round(time.time() - t, 1),
            }
            log.info("%s", row)
            if on_row:
                on_row(row)
            rows.append(row)
    return rows
