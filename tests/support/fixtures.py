"""Tiny seeded model checkpoints and generated images for fast tests."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]


def tiny_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    metrics: dict | None = None,
    unfamiliarity: bool = False,
    train_on: Path | None = None,
) -> Path:
    """Write a seeded 'tiny' model checkpoint with the six TrashNet classes (version = seed).

    With *train_on* (an ImageFolder of the six classes), the network is trained on those
    photos, so that it labels photos like them with clear margins (a random head
    leaves near ties that any rounding, int8 included, may flip).

    With *unfamiliarity*, statistics fitted on its features of 80 generated images (labels
    cycling through the classes) and a shift detector against the same images darkened, the
    threshold on 40 more, and a shift slope of 0.5.
    """
    import numpy as np
    import torch

    from training.model.checkpoint import save_checkpoint
    from training.model.factory import create_model
    from training.model.preprocess import PreprocessSpec

    torch.manual_seed(seed)
    model = create_model("tiny", num_classes=len(CLASSES))
    spec = PreprocessSpec(resize=40, crop=32)
    if train_on is not None:
        _fit_head(model, spec, train_on)
    stats, extra = None, {}
    if unfamiliarity:
        from training.data.features import extract
        from training.model import unfamiliarity as unf
        from training.model.imaging import decode_image

        imgs = [np.asarray(decode_image(jpeg_bytes(i))) for i in range(120)]
        feats = extract(model, imgs, spec)
        dark = extract(model, [(a * 0.4).astype(np.uint8) for a in imgs[:80]], spec)
        stats, thr = unf.fit(feats[:80], np.arange(80) % len(CLASSES), feats[80:], shifted_x=dark)
        extra = {
            "unfamiliarity": {"method": unf.method(stats), "threshold": thr, "shift_slope": 0.5}
        }
    save_checkpoint(
        path,
        model,
        {
            **extra,
            "name": "tiny-test",
            "version": str(seed),
            "arch": "tiny",
            "classes": CLASSES,
            "preprocess": spec.to_dict(),
            "metrics": metrics or {},
        },
        unfamiliarity=stats,
    )
    return path


def _fit_head(model, spec, folder: Path) -> None:
    """Train *model* (200 full-batch Adam steps) on the photos of the ImageFolder *folder*."""
    import numpy as np
    import torch
    from PIL import Image

    from training.model.preprocess import preprocess

    imgs, labels = [], []
    for k, c in enumerate(CLASSES):
        for f in sorted((folder / c).glob("*.jpg")):
            try:
                imgs.append(preprocess(Image.open(f).convert("RGB"), spec))
            except OSError:  # the ImageFolder's corrupt file
                continue
            labels.append(k)
    x, y = torch.from_numpy(np.stack(imgs)), torch.tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 64), fmt: str = "JPEG", **kw) -> bytes:
    """A small random-coloured image."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, x0 + 10, y0 + 10))
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_images(folder: Path, n: int, *, prefix: str = "img") -> list[Path]:
    """Write *n* small JPEGs into *folder*."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:05d}.jpg"
        p.write_bytes(jpeg_bytes(i))
        paths.append(p)
    return paths


def tiny_run(root: Path) -> dict:
    """A tiny frozen run (2 epochs, version 1.0.0) on generated photos under *root*: its data
    folder, feature cache and checkpoint (the base model the adapt tests start from)."""
    from tests.unit.test_training import make_imagefolder
    from training.fit.run import RunConfig, train
    from training.fit.train import FrozenParams

    data = make_imagefolder(root / "data", per_class=8)
    cfg = RunConfig(data=str(data), out=str(root / "run"), arch="tiny", pretrained="none",
                    frozen=FrozenParams(epochs=2), aug_views=0, register=False, version="1.0.0",
                    cache_dir=str(root / "cache"), robustness=False)  # fmt: skip
    return {"root": root, "data": data, "cache": root / "cache",
            "checkpoint": Path(train(cfg)["checkpoint"])}  # fmt: skip
