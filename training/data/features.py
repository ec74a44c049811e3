"""Frozen-backbone features, computed once and cached on disk.

The cache key is the architecture, the weights, the manifest sha256 and the preprocessing, so
a linear-head epoch over cached features costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.model.factory import forward_features
from training.model.preprocess import PreprocessSpec, preprocess

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def spec_key(spec: PreprocessSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def extract(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    spec: PreprocessSpec,
    *,
    transform: Callable[[Image.Image], np.ndarray] | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Pooled features (N, D) of uint8 HWC images through the eval transform (or *transform*),
    on the device *model* is on, without autograd. Batches of 16 on a CPU (Lite2 at 260 px on
    two cores: 8-11 s for 321 photos in batches of 4-16, 12.5-13 s in batches of 64, one run),
    64 on an accelerator."""
    model.eval()
    fn = transform or (lambda im: preprocess(im, spec))
    device = next(model.parameters()).device
    batch_size = batch_size or (16 if device.type == "cpu" else 64)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = np.stack([fn(Image.fromarray(a)) for a in images[i : i + batch_size]])
            x = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
            out.append(forward_features(model, x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def cached_features(
    key_parts: dict,
    compute: Callable[[], dict[str, np.ndarray]],
    cache_dir: str | Path,
) -> dict[str, np.ndarray]:
    """Return ``compute()``'s arrays, loading them from ``cache_dir`` when the key matches."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{key_parts.get('arch', 'model')}-{key}.npz"
    path = Path(cache_dir) / "features" / name
    if path.exists():
        log.info("features from cache %s", path)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps(key_parts, indent=1, sort_keys=True))
    return arrays


def frozen_features(
    model,
    images: dict,
    spec: PreprocessSpec,
    *,
    arch: str,
    pretrained: str,
    manifest_sha256: str,
    augment: str,
    views: int,
    seed: int,
    cache_dir: str | Path,
) -> dict[str, np.ndarray]:
    """Clean features of every split, plus *views* augmented views of the training images.

    Cached under the architecture, weights, split manifest and preprocessing (and, for the
    augmented views, the preset, count and seed): ``sortline train`` and ``sortline tune``
    share the cache.
    """
    from training.data.augment import build_augment

    key = {
        "arch": arch,
        "pretrained": pretrained,
        "manifest_sha256": manifest_sha256,
        "preprocess": spec_key(spec),
    }
    out = cached_features(
        key,
        lambda: {sp: extract(model, images[sp], spec) for sp in ("train", "val", "test")},
        cache_dir,
    )
    if views:

        def compute() -> dict[str, np.ndarray]:
            seed_everything(seed)
            aug = build_augment(augment, spec)
            return {
                "train_aug": np.stack(
                    [extract(model, images["train"], spec, transform=aug) for _ in range(views)]
                )
            }

        aug_key = {**key, "augment": augment, "views": views, "seed": seed}
        out = {**out, **cached_features(aug_key, compute, cache_dir)}
    return out


def split_features(
    model: torch.nn.Module,
    checkpoint_sha256: str,
    arch: str,
    spec: PreprocessSpec,
    dataset,
    cache_dir: str | Path,
) -> dict[str, np.ndarray]:
    """A checkpoint's pooled features and labels on every split of *dataset* (``train_x``,
    ``train_y``, ...), cached under the checkpoint's sha256, the manifest and the preprocessing."""
    from training.data.dataset import SPLITS, load_resized, manifest_sha256

    key = {"arch": arch, "checkpoint": checkpoint_sha256,
           "manifest_sha256": manifest_sha256(dataset), "preprocess": spec_key(spec)}  # fmt: skip

    def compute() -> dict[str, np.ndarray]:
        out = {}
        for sp in SPLITS:
            samples = dataset.split(sp)
            imgs = load_resized(dataset, samples, short_side=spec.resize, cache_dir=Path(cache_dir))
            out[f"{sp}_x"] = extract(model, imgs, spec)
            out[f"{sp}_y"] = np.array([dataset.label_index(s) for s in samples], np.int64)
        return out

    return cached_features(key, compute, cache_dir)
