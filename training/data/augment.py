"""Online augmentation presets by name, and the scene tools (object mask, textures) they use.

Every preset maps an RGB PIL image to the normalised float32 CHW array the model takes; the
last step is always :func:`training.model.preprocess.normalise` with the checkpoint's spec, so the
pixel scaling is the eval transform's. The reference study's six presets are ``none``,
``rotation``, ``hflip``, ``vflip``, ``colorjitter`` and ``combined``; ``finetune`` adds random
resized crops, and ``robust`` also swaps the white posterboard for other backgrounds, zooms
out, blurs, recompresses and relights, because users photograph waste on floors and tables.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter
from torchvision import transforms as T

from sortline.errors import ConfigError
from training.model.preprocess import PreprocessSpec, normalise, resize_crop

Augment = Callable[[Image.Image], np.ndarray]

# texture families used by the training preset; the robustness check also uses others
TRAIN_TEXTURES = ("noise", "solid", "stripes", "gradient")
HELDOUT_TEXTURES = ("wood", "tiles", "concrete", "dark")


# ---------------------------------------------------------------- object mask


def object_mask(arr: np.ndarray) -> np.ndarray | None:
    """Soft mask in [0, 1] (H, W) of the object on a TrashNet-style light, plain board.

    The board colour is taken from the image border; pixels close to it in chroma and not much
    darker count as background. Holes are filled so transparent objects stay whole. Returns
    None when the photo does not look like an object on a light board (the border is not
    light and neutral, or the object would cover under 4% or over 90% of the photo).
    """
    from scipy import ndimage as ndi

    a = arr.astype(np.float32) / 255.0
    h, w = a.shape[:2]
    b = max(2, min(h, w) // 40)
    border = np.concatenate(
        [
            a[:b].reshape(-1, 3),
            a[-b:].reshape(-1, 3),
            a[:, :b].reshape(-1, 3),
            a[:, -b:].reshape(-1, 3),
        ]
    )
    board = np.median(border, axis=0)
    lum = a.mean(axis=2)
    board_lum = float(board.mean())
    chroma = a - lum[..., None]
    board_chroma = board - board_lum
    if board_lum < 0.4 or float(np.abs(board_chroma).max()) > 0.08:
        return None
    cdist = np.sqrt(((chroma - board_chroma) ** 2).sum(axis=2))
    # local brightness of the board (it is unevenly lit): a heavily blurred luminance
    bg = (cdist < 0.06) & (lum > 0.55 * board_lum) & (lum < 1.3 * board_lum + 0.05)
    obj = ~bg
    obj = ndi.binary_opening(obj, iterations=2)
    obj = ndi.binary_closing(obj, iterations=3)
    obj = ndi.binary_fill_holes(obj)
    labels, n = ndi.label(obj)
    if n > 1:  # keep components that are not tiny specks
        sizes = ndi.sum(obj, labels, range(1, n + 1))
        keep = np.isin(labels, 1 + np.nonzero(sizes >= max(50, 0.02 * sizes.max()))[0])
        obj = keep
    frac = float(obj.mean())
    if not 0.04 <= frac <= 0.9:
        return None
    soft = ndi.gaussian_filter(obj.astype(np.float32), 1.5)
    return np.clip(soft, 0.0, 1.0)


# ---------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, ch: int = 1) -> np.ndarray:
    small = rng.random((cells, max(2, cells * w // h), ch), dtype=np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8).squeeze()).resize((w, h), Image.BICUBIC)
    out = np.asarray(img, dtype=np.float32) / 255.0
    return out if out.ndim == 3 else out[..., None]


def texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 (H, W, 3) background in [0, 1] of the named family."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    if kind == "solid":
        t = np.broadcast_to(c1, (h, w, 3)).copy()
        t += (rng.random((h, w, 1), dtype=np.float32) - 0.5) * 0.04
    elif kind == "gradient":
        ang = rng.uniform(0, np.pi)
        g = np.cos(ang) * xx + np.sin(ang) * yy
        g = ((g - g.min()) / (np.ptp(g) + 1e-6))[..., None]
        t = c1 * (1 - g) + c2 * g
    elif kind == "noise":
        n = _smooth_noise(rng, h, w, int(rng.integers(4, 40)), 3)
        t = c1 * 0.6 + (n - 0.5) * rng.uniform(0.2, 0.8)
    elif kind == "stripes":
        period = rng.uniform(6, 40)
        ang = rng.uniform(0, np.pi)
        s = (np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * 2 * np.pi / period) > 0)[..., None]
        t = np.where(s, c1, c1 * 0.6 + c2 * 0.4)
    elif kind == "wood":
        base = np.array([0.55, 0.36, 0.2], np.float32) * rng.uniform(0.6, 1.3)
        warp = _smooth_noise(rng, h, w, 6)[..., 0] * 30
        rings = np.sin((yy + warp) / rng.uniform(3, 8)) * 0.5 + 0.5
        t = base * (0.75 + 0.25 * rings[..., None])
    elif kind == "tiles":
        size = int(rng.integers(24, 80))
        grout = ((xx % size) < 3) | ((yy % size) < 3)
        chk = (((xx // size) + (yy // size)) % 2)[..., None]
        t = np.where(chk > 0, c1, c1 * 0.85)
        t = np.where(grout[..., None], c2 * 0.5, t)
    elif kind == "concrete":
        g = rng.uniform(0.35, 0.7)
        n = _smooth_noise(rng, h, w, 60)[..., 0] * 0.2 + rng.random((h, w), dtype=np.float32) * 0.12
        t = np.repeat((g + n - 0.16)[..., None], 3, axis=2)
    elif kind == "dark":
        g = rng.uniform(0.05, 0.25)
        t = np.broadcast_to(np.array([g, g, g * 1.1], np.float32), (h, w, 3)).copy()
        t += rng.random((h, w, 1), dtype=np.float32) * 0.06
    else:
        raise ConfigError(f"unknown texture {kind!r}")
    return np.clip(t, 0.0, 1.0).astype(np.float32)


def replace_background(
    img: Image.Image, kind: str, rng: np.random.Generator, mask: np.ndarray | None = None
) -> Image.Image:
    """Composite the object of *img* onto a generated texture of family *kind*."""
    m = object_mask(np.asarray(img)) if mask is None else mask
    if m is None:
        return img
    a = np.asarray(img, dtype=np.float32) / 255.0
    t = texture(kind, a.shape[0], a.shape[1], rng)
    # keep the object's shading but drop the board: shadow cast on the new background
    out = a * m[..., None] + t * (1 - m[..., None])
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def zoom_out(img: Image.Image, factor: float, kind: str, rng: np.random.Generator) -> Image.Image:
    """Shrink the photo by *factor* onto a textured canvas of the original size."""
    w, h = img.size
    nw, nh = max(8, round(w * factor)), max(8, round(h * factor))
    small = img.resize((nw, nh), Image.BILINEAR)
    mask = object_mask(np.asarray(small))
    if mask is None:  # no clean object: shrink the whole photo onto the canvas
        mask = np.ones((nh, nw), np.float32)
    canvas = Image.fromarray((texture(kind, h, w, rng) * 255).astype(np.uint8))
    x, y = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
    canvas.paste(small, (x, y), Image.fromarray((mask * 255).astype(np.uint8)))
    return canvas


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def relight(
    img: Image.Image, gain: float, gamma: float, cast: tuple[float, float, float]
) -> Image.Image:
    """Exposure *gain*, *gamma* and a per-channel colour *cast* (white balance)."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = np.clip(a * gain * np.asarray(cast, np.float32), 0, 1) ** gamma
    return Image.fromarray((a * 255).astype(np.uint8))


# ---------------------------------------------------------------- presets


class _Robust:
    """Scene-level augmentation: background, zoom-out, lighting, blur, JPEG (all random)."""

    def __init__(self, p_background: float = 0.6, p_zoom: float = 0.25) -> None:
        self.p_background, self.p_zoom = p_background, p_zoom

    def __call__(self, img: Image.Image) -> Image.Image:
        rng = np.random.default_rng(random.getrandbits(32))
        if random.random() < self.p_zoom:
            img = zoom_out(img, random.uniform(0.45, 0.8), random.choice(TRAIN_TEXTURES), rng)
        elif random.random() < self.p_background:
            img = replace_background(img, random.choice(TRAIN_TEXTURES), rng)
        if random.random() < 0.5:
            cast = tuple(random.uniform(0.85, 1.15) for _ in range(3))
            img = relight(img, random.uniform(0.6, 1.3), random.uniform(0.7, 1.4), cast)
        if random.random() < 0.25:
            img = img.filter(ImageFilter.GaussianBlur(random.uniform(0.5, 2.5)))
        if random.random() < 0.3:
            img = jpeg(img, random.randint(15, 70))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.ROTATE_90)
        return img


def _pil_steps(name: str, spec: PreprocessSpec) -> list[Callable[[Image.Image], Image.Image]]:
    eval_crop = [lambda im: resize_crop(im, spec)]
    jitter = T.ColorJitter(0.2, 0.2, 0.2, 0.1)
    if name == "none":
        return eval_crop
    if name == "rotation":
        return [*eval_crop, T.RandomRotation(25)]
    if name == "hflip":
        return [*eval_crop, T.RandomHorizontalFlip()]
    if name == "vflip":
        return [*eval_crop, T.RandomVerticalFlip()]
    if name == "colorjitter":
        return [*eval_crop, jitter]
    if name == "combined":
        return [
            *eval_crop,
            T.RandomRotation(25),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            jitter,
        ]
    rrc = T.RandomResizedCrop(spec.crop, scale=(0.3, 1.0), ratio=(0.75, 1.333))
    if name == "finetune":
        return [
            rrc,
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(15),
            T.ColorJitter(0.3, 0.3, 0.3, 0.05),
        ]
    if name == "robust":
        return [
            _Robust(),
            rrc,
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ColorJitter(0.25, 0.25, 0.25, 0.05),
            T.RandomGrayscale(0.05),
        ]
    if name == "robust_mix":  # half the samples in-domain (finetune), half robust
        a, b = _pil_steps("finetune", spec), _pil_steps("robust", spec)
        return [lambda im: _chain(a if random.random() < 0.5 else b, im)]
    raise ConfigError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")


def _chain(steps, img: Image.Image) -> Image.Image:
    for s in steps:
        img = s(img)
    return img


PRESETS = (
    "none",
    "rotation",
    "hflip",
    "vflip",
    "colorjitter",
    "combined",
    "finetune",
    "robust",
    "robust_mix",
)


def build_augment(name: str, spec: PreprocessSpec) -> Augment:
    """The named preset as a function PIL image -> normalised CHW float32 array.

    Example:
        >>> from training.model.preprocess import PreprocessSpec
        >>> f = build_augment("combined", PreprocessSpec())
        >>> f(Image.new("RGB", (384, 512))).shape
        (3, 224, 224)
    """
    steps = _pil_steps(name, spec)

    def apply(img: Image.Image) -> np.ndarray:
        img = _chain(steps, img)
        if img.size != (spec.crop, spec.crop):
            img = resize_crop(img, spec)
        return normalise(img, spec)

    return apply


# ---------------------------------------------------------------- a site's look


def _sharpness(a: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute Laplacian of the luminance over its spread (inside *mask* where given):
    how much fine detail the picture, or its object, holds."""
    g = a.astype(np.float32).mean(axis=2)
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    if mask is None or mask[1:-1, 1:-1].sum() < 16:
        return float(lap.mean() / (g.std() + 1e-3))
    m = mask[1:-1, 1:-1] > 0.5
    return float(lap[m].mean() / (g[1:-1, 1:-1][m].std() + 1e-3))


# RGB distance from every border colour beyond which a pixel is a site photo's object
# (:func:`site_object_mask`): a site's dim light brings objects near the floor's colours (on
# the val split under the proxy of ``bench/adapt.py``, 0.12 found an object in 214 photos of
# 324, 0.06 in 276)
OBJECT_TOL = 0.06


def _small(a: np.ndarray, side: int = 96) -> np.ndarray:
    h, w = a.shape[:2]
    s = side / min(h, w)
    return np.asarray(Image.fromarray(a).resize((max(8, round(w * s)), max(8, round(h * s)))))


def site_object_mask(a: np.ndarray, border: float = 0.125, tol: float = 0.12) -> np.ndarray:
    """Boolean (H, W) mask of what differs from a photo's floor: pixels whose colour is
    farther than *tol* (RGB in [0, 1]) from every colour seen on the photo's border strip.
    For a site's photos of one object on its floor, whatever the floor is."""
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    x = a.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    b = max(1, round(min(h, w) * border))
    edge = np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3),
                           x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3)])  # fmt: skip
    edge = edge[np.random.default_rng(0).choice(len(edge), min(256, len(edge)), replace=False)]
    # distance to the nearest border colour (a tree: a tenth of the time of all the pairs)
    d = cKDTree(edge).query(x.reshape(-1, 3), k=1)[0]
    obj = ndi.binary_opening(d.reshape(h, w) > tol, iterations=2)
    return ndi.binary_fill_holes(ndi.binary_closing(obj, iterations=2))


def _box_share(m: np.ndarray) -> float:
    """The share of the frame taken by the bounding box of mask *m* (0 when empty)."""
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    if not len(rows):
        return 0.0
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / m.size)


def _floor_canvas(patch: np.ndarray, h: int, w: int) -> np.ndarray:
    """A canvas of (h, w) tiled from *patch* and its mirror images (no seams)."""
    tile = np.concatenate([patch, patch[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1)
    return np.tile(tile, reps)[:h, :w]


class SiteLook:
    """The look of a site's photos, estimated from the photos alone, and applied to others.

    Fitted on a site's reviewed photos and a sample of training photos (uint8 HWC):

    - the floor: patches from the site photos' corners (where an object seldom is);
    - the object's size: the zoom at which training photos laid on the site's floor show as
      large a box around what differs from the floor (:func:`site_object_mask`) as the site's
      photos do (measured the same way on both, so the measure's own errors cancel);
    - the light: the mean colour of the site's objects over that of the training objects, per
      channel (the same classes of object, so on average the same colours: what differs is
      the light and the camera's white balance), as a gain applied to the object;
    - the focus: the blur that gives training objects, so rendered, the site objects' median
      fine detail.

    Applied to a training photo (an object on a white board), it cuts the object out (or takes
    the whole photo when it cannot), relights it, shrinks it, lays it on one of the site's
    floor patches, blurs it and recompresses it (random JPEG quality 25-90). ``sortline
    adapt`` replays training photos in this look beside the reviewed ones, so the network
    learns the site's look on many more objects than were reviewed.
    """

    BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    ZOOMS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)

    def __init__(self, floors: list[np.ndarray], gain: np.ndarray, zoom: float,
                 blur: float = 0.0) -> None:  # fmt: skip
        self.floors, self.gain, self.zoom, self.blur = floors, gain, zoom, blur

    @classmethod
    def fit(cls, site: list[np.ndarray], others: list[np.ndarray], seed: int = 0) -> SiteLook:
        rng = np.random.default_rng(seed)
        floors, site_box, site_px, site_sharp = [], [], [], []
        for a in site:
            small = _small(a)
            m = site_object_mask(small, tol=OBJECT_TOL)
            s, k = max(8, min(a.shape[:2]) // 4), max(1, min(m.shape) // 4)
            corners = [(a[:s, :s], m[:k, :k]), (a[:s, -s:], m[:k, -k:]),
                       (a[-s:, :s], m[-k:, :k]), (a[-s:, -s:], m[-k:, -k:])]  # fmt: skip
            floors += [patch for patch, mk in corners if mk.mean() < 0.01]  # no object in it
            if m.sum() >= 16:
                site_box.append(_box_share(m))
                site_px.append(small[m].astype(np.float32))
                site_sharp.append(_sharpness(a, _upmask(m, a.shape[:2])))
        if not floors:  # every corner shows an object: take them all
            floors = [a[: max(8, min(a.shape[:2]) // 4), : max(8, min(a.shape[:2]) // 4)]
                      for a in site]  # fmt: skip
        sample = [others[i] for i in rng.choice(len(others), min(48, len(others)), replace=False)]
        train_px = []
        for a in sample:
            small = _small(a)
            m = object_mask(small)
            if m is not None:
                train_px.append(small[m > 0.5].astype(np.float32))
        if site_px and train_px:
            gain = np.concatenate(site_px).mean(0) / (np.concatenate(train_px).mean(0) + 1.0)
        else:
            gain = np.ones(3, np.float32)
        look = cls(floors, np.clip(gain, 0.2, 2.0), 1.0)
        sample = sample[:24]

        def rendered(i: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return look.render(a, np.random.default_rng([seed, i]), quality=95)

        def boxes() -> list[float]:  # the rendered photos measured as the site's were
            out = [site_object_mask(_small(rendered(i, a)[0]), tol=OBJECT_TOL)
                   for i, a in enumerate(sample)]  # fmt: skip
            return [_box_share(m) for m in out if m.sum() >= 16]

        def sharpness() -> list[float]:
            return [_sharpness(*rendered(i, a)) for i, a in enumerate(sample)]

        # zoom and blur by synthesis: training photos rendered at each candidate on the site's
        # floors, measured as the site's photos were, until they match the site's median; the
        # zoom again once the blur is known (a blurred object's box measures differently)
        if site_box:
            look.zoom = _closest(look, "zoom", cls.ZOOMS, float(np.median(site_box)), boxes, 1e-3)
        if site_sharp:
            look.blur = _closest(look, "blur", cls.BLURS, float(np.median(site_sharp)), sharpness)
        if site_box:
            look.zoom = _closest(look, "zoom", cls.ZOOMS, float(np.median(site_box)), boxes, 1e-3)
        return look

    def describe(self) -> dict:
        return {"gain": [round(float(g), 3) for g in self.gain], "zoom": round(self.zoom, 3),
                "blur": self.blur, "floors": len(self.floors)}  # fmt: skip

    def render(
        self, a: np.ndarray, rng: np.random.Generator, quality: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """*a* in the site's look (uint8 HWC, same size) and where its object lies."""
        h, w = a.shape[:2]
        floor = self.floors[int(rng.integers(len(self.floors)))]
        canvas = _floor_canvas(floor, h, w).astype(np.float32) / 255.0
        factor = float(np.clip(self.zoom * rng.uniform(0.85, 1.15), 0.15, 1.0))
        nw, nh = max(8, round(w * factor)), max(8, round(h * factor))
        small = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))
        mask = object_mask(small)
        m = np.ones((nh, nw, 1), np.float32) if mask is None else mask[..., None]
        lit = np.clip(small / 255.0 * self.gain * rng.uniform(0.9, 1.1), 0, 1)
        x, y = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
        region = canvas[y : y + nh, x : x + nw]
        canvas[y : y + nh, x : x + nw] = lit * m + region * (1 - m)
        where = np.zeros((h, w), np.float32)
        where[y : y + nh, x : x + nw] = m[..., 0]
        im = Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8))
        if self.blur > 0:
            im = im.filter(ImageFilter.GaussianBlur(self.blur))
        q = quality if quality is not None else int(rng.integers(25, 90))
        return np.asarray(jpeg(im, q)), where

    def apply(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """*a* (uint8 HWC, a training photo) in the site's look (uint8 HWC, same size)."""
        return self.render(a, rng)[0]


def _closest(look, name: str, candidates, target: float, measure, eps: float = 0.0) -> float:
    """The candidate value of *look*'s setting *name* whose *measure* (a list, its median
    taken) is closest to *target* on a log scale."""
    errs = []
    for value in candidates:
        setattr(look, name, value)
        errs.append(abs(np.log((np.median(measure() or [0.0]) + eps) / (target + eps))))
    return candidates[int(np.argmin(errs))]


def _upmask(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(m.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(im) > 127
