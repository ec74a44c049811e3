"""Evaluation preprocessing, defined once: training, evaluation and the worker all use it.

A checkpoint stores its :class:`PreprocessSpec`, so a worker cannot pair the wrong
transform with a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from training.model.imaging import DEFAULT_MAX_PIXELS, decode_image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side, centre-crop a square, scale to [0, 1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: d[k] for k in ("resize", "crop", "interpolation") if k in d}
        return cls(
            mean=tuple(d.get("mean", cls.mean)),
            std=tuple(d.get("std", cls.std)),
            extra=dict(d.get("extra", {})),
            **known,
        )


def resize_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize`` and take the centre ``spec.crop`` square."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale))
    img = img.resize((nw, nh), _RESAMPLE[spec.interpolation], reducing_gap=None)
    left, top = (nw - spec.crop) // 2, (nh - spec.crop) // 2
    return img.crop((left, top, left + spec.crop, top + spec.crop))


def normalise(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB image (already at its final size) as a normalised float32 CHW array."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    out = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The evaluation transform: resize, centre crop, normalise."""
    return normalise(resize_crop(img, spec), spec)


def load_and_preprocess(
    data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode image bytes (JPEG draft mode at the resize size) and preprocess them."""
    img = decode_image(data, max_pixels=max_pixels, draft=(spec.resize, spec.resize))
    return preprocess(img, spec)
