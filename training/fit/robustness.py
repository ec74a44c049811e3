"""A robustness check: TrashNet images changed the way users' phone photos differ from them.

Every TrashNet photo shows one object on a white posterboard. Here the board is replaced by
textures that the ``robust`` training preset never generates (wood, tiles, concrete, dark
carpet), the object is shown smaller or cropped tighter, the photo is turned to landscape,
blurred, recompressed and relit. Each corruption is deterministic (seeded per image), so two
models are compared on exactly the same pictures. Accuracy and macro-F1 are reported per
corruption, with their mean over the corruptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from training.data.augment import (
    HELDOUT_TEXTURES,
    jpeg,
    object_mask,
    relight,
    replace_background,
    zoom_out,
)
from training.model.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

Corruption = Callable[[Image.Image, np.random.Generator], Image.Image]


def _bg(kind: str) -> Corruption:
    return lambda im, rng: replace_background(im, kind, rng)


def _crop(frac: float) -> Corruption:
    def f(im: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = im.size
        cw, ch = round(w * frac), round(h * frac)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x, y, x + cw, y + ch))

    return f


def _scene(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A plausible phone photo: other floor, object smaller, warmer light, stronger JPEG."""
    kind = HELDOUT_TEXTURES[int(rng.integers(len(HELDOUT_TEXTURES)))]
    im = zoom_out(im, float(rng.uniform(0.6, 0.85)), kind, rng)
    im = relight(im, float(rng.uniform(0.7, 1.1)), 1.0, (1.1, 1.0, 0.85))
    return jpeg(im, 40)


def _site(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A "new site" proxy: one plant camera, the object small on a tiled floor, under a
    cold fluorescent cast, dim, slightly out of focus and strongly compressed; the same for
    every photo, as a site's own photos are (``bench/adapt.py``)."""
    im = zoom_out(im, float(rng.uniform(0.4, 0.55)), "tiles", rng)
    im = relight(im, float(rng.uniform(0.55, 0.7)), 1.1, (0.85, 1.05, 1.2))
    return jpeg(im.filter(ImageFilter.GaussianBlur(1.2)), 30)


# not part of the robustness report's mean: the new-site proxy of ``sortline adapt``
SITES: dict[str, Corruption] = {"site": _site}

CORRUPTIONS: dict[str, Corruption] = {
    "clean": lambda im, rng: im,
    **{f"background_{k}": _bg(k) for k in HELDOUT_TEXTURES},
    "zoom_out_0.6": lambda im, rng: zoom_out(im, 0.6, "concrete", rng),
    "crop_0.6": _crop(0.6),
    "landscape_rot90": lambda im, rng: im.transpose(Image.Transpose.ROTATE_90),
    "blur_2.5": lambda im, rng: im.filter(ImageFilter.GaussianBlur(2.5)),
    "jpeg_q15": lambda im, rng: jpeg(im, 15),
    "dark": lambda im, rng: relight(im, 0.45, 1.2, (1.0, 1.0, 1.0)),
    "warm_bright": lambda im, rng: relight(im, 1.3, 0.9, (1.15, 1.0, 0.8)),
    "scene": _scene,
}


# what the unfamiliarity score's shift detector and the shift temperature are fitted on (train
# and val photos); kept apart from the proxy that checks them (``bench/unfamiliarity.py``:
# scene, zoom_out_0.6, crop_0.6, dark, background_wood on the test split)
SHIFT_FIT = (
    "background_tiles", "background_concrete", "background_dark", "blur_2.5", "jpeg_q15",
    "warm_bright", "landscape_rot90",
)  # fmt: skip


def corrupt_mixed(
    images: Sequence[np.ndarray], names: Sequence[str], seed: int = 0
) -> list[Image.Image]:
    """Each image under one of *names*, drawn per image (deterministic)."""
    pick = np.random.default_rng([seed, len(images)]).integers(len(names), size=len(images))
    out = []
    for i, a in enumerate(images):
        rng = np.random.default_rng([seed, i, 7])
        out.append(CORRUPTIONS[names[pick[i]]](Image.fromarray(a), rng))
    return out


def corrupt(images: Sequence[np.ndarray], name: str, seed: int = 0) -> list[Image.Image]:
    """The images with corruption *name* applied (deterministic per image index)."""
    fn = CORRUPTIONS.get(name) or SITES[name]
    out = []
    for i, a in enumerate(images):
        rng = np.random.default_rng([seed, i, sum(map(ord, name))])
        out.append(fn(Image.fromarray(a), rng))
    return out


@torch.no_grad()
def robustness_report(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    y: Sequence[int],
    spec: PreprocessSpec,
    *,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """Accuracy and macro-F1 of *model* per corruption, and their mean over the corruptions."""
    from training.fit.evaluate import classification_metrics, predict_logits

    y = np.asarray(y)
    nc = int(max(y.max() + 1, 2))
    names = list(names or CORRUPTIONS)
    per: dict[str, dict] = {}
    for name in names:
        imgs = corrupt(images, name, seed)
        pred = predict_logits(model, imgs, spec).argmax(1)
        m = classification_metrics(y, pred, [str(i) for i in range(nc)])
        per[name] = {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}
        log.info("robustness %s: %s", name, per[name])
    corrupted = [n for n in names if n != "clean"]
    mean = {
        "accuracy": round(float(np.mean([per[n]["accuracy"] for n in corrupted])), 4)
        if corrupted
        else None,
        "macro_f1": round(float(np.mean([per[n]["macro_f1"] for n in corrupted])), 4)
        if corrupted
        else None,
    }
    masked = sum(object_mask(a) is not None for a in images)
    return {
        "n": len(y),
        "per_corruption": per,
        "mean_corrupted": mean,
        "background_replaced_fraction": round(masked / max(1, len(images)), 3),
    }
