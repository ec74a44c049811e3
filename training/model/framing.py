"""A site's framing: crop a fixed camera's photo around its object, to the size the model learnt.

A site's camera (a belt, a bin's lid, a sorting table) shows every object smaller than
TrashNet's photos do, on the same floor. ``sortline adapt`` measures that floor and the
objects' size on the reviewed photos (``training.data.augment.SiteLook``) and stores a framing
in the adapted checkpoint's preprocessing (``PreprocessSpec.extra["framing"]``): a photo whose
border is the site's floor is cropped, before the usual resize and centre crop, to a window of
the frame around what differs from the floor, so that its object shows at the size the training
photos showed theirs; any other photo (a TrashNet-like photo on a white board, another site's)
passes unchanged. The crop is found on a small copy (:data:`SMALL` pixels), a few milliseconds.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SMALL = 96  # the shorter side of the copy the floor and the object are measured on
BORDER = 0.125  # the border strip where the floor is looked for, as a share of the shorter side
TOL = 0.12  # RGB distance (in [0, 1]) within which a border pixel counts as the site's floor
# share of the border strip that must be the site's floor for a photo to be framed: on the
# val split, the proxy's site photos 0.9 or more (5th percentile), clean photos 0.63 at most
MIN_FLOOR = 0.8
# RGB distance from every border colour beyond which a pixel is the object's: lower than TOL,
# since a site's dim light brings objects near the floor's colours (on the val split under the
# proxy, 0.12 found an object in 214 photos of 324, 0.06 in 276)
OBJECT_TOL = 0.06


def small_copy(a: np.ndarray, side: int = SMALL) -> np.ndarray:
    """*a* (uint8 HWC) resized so that its shorter side is *side* pixels."""
    h, w = a.shape[:2]
    s = side / min(h, w)
    return np.asarray(Image.fromarray(a).resize((max(8, round(w * s)), max(8, round(h * s)))))


def _border(x: np.ndarray, border: float) -> np.ndarray:
    b = max(1, round(min(x.shape[:2]) * border))
    return np.concatenate([x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3),
                           x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3)])  # fmt: skip


def site_object_mask(a: np.ndarray, border: float = BORDER, tol: float = TOL) -> np.ndarray:
    """Boolean (H, W) mask of what differs from a photo's floor: pixels whose colour is
    farther than *tol* (RGB in [0, 1]) from every colour seen on the photo's border strip.
    For a site's photos of one object on its floor, whatever the floor is."""
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    x = a.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    edge = _border(x, border)
    edge = edge[np.random.default_rng(0).choice(len(edge), min(256, len(edge)), replace=False)]
    # distance to the nearest border colour (a tree: a tenth of the time of all the pairs)
    d = cKDTree(edge).query(x.reshape(-1, 3), k=1)[0]
    obj = ndi.binary_opening(d.reshape(h, w) > tol, iterations=2)
    return ndi.binary_fill_holes(ndi.binary_closing(obj, iterations=2))


def box_share(m: np.ndarray) -> float:
    """The share of the frame taken by the bounding box of mask *m* (0 when empty)."""
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    if not len(rows):
        return 0.0
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / m.size)


def fit(floors: list[np.ndarray], window: float, *, n_colours: int = 512, seed: int = 0) -> dict:
    """A framing from a site's floor patches (uint8 HWC, e.g. ``SiteLook.floors``) and the
    crop window (share of the frame's width and height, at most 1)."""
    rng = np.random.default_rng(seed)
    px = np.concatenate([small_copy(f, max(8, min(f.shape[:2]) * SMALL // 256)).reshape(-1, 3)
                         for f in floors])  # fmt: skip
    px = px[rng.choice(len(px), min(n_colours, len(px)), replace=False)]
    return {
        "floor": [[round(float(v) / 255.0, 4) for v in c] for c in px],
        "window": round(float(np.clip(window, 0.2, 1.0)), 4),
        "tol": TOL,
        "object_tol": OBJECT_TOL,
        "min_floor": MIN_FLOOR,
    }


def floor_share(small: np.ndarray, framing: dict) -> float:
    """The share of *small*'s border strip within ``tol`` of the site's floor colours."""
    from scipy.spatial import cKDTree

    edge = _border(small.astype(np.float32) / 255.0, BORDER)
    floor = np.asarray(framing["floor"], np.float32)
    return float((cKDTree(floor).query(edge, k=1)[0] <= framing["tol"]).mean())


def window_box(a: np.ndarray, framing: dict) -> tuple[int, int, int, int] | None:
    """The crop (left, top, right, bottom) of *a* (uint8 HWC) that *framing* asks for, or None
    when the photo is not the site's (its border is not the site's floor) or shows no object."""
    if framing.get("window", 1.0) >= 1.0:
        return None
    small = small_copy(a, SMALL)
    if floor_share(small, framing) < framing.get("min_floor", MIN_FLOOR):
        return None
    m = site_object_mask(small, tol=framing.get("object_tol", framing["tol"]))
    if m.sum() < max(16, 0.002 * m.size):
        return None
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    h, w = a.shape[:2]
    sy, sx = h / m.shape[0], w / m.shape[1]
    cy, cx = (rows[0] + rows[-1] + 1) / 2 * sy, (cols[0] + cols[-1] + 1) / 2 * sx
    ch, cw = max(8, round(h * framing["window"])), max(8, round(w * framing["window"]))
    top = int(np.clip(round(cy - ch / 2), 0, h - ch))
    left = int(np.clip(round(cx - cw / 2), 0, w - cw))
    return left, top, left + cw, top + ch


def frame(img: Image.Image, framing: dict) -> Image.Image:
    """*img* cropped as *framing* asks (see :func:`window_box`), or *img* itself."""
    box = window_box(np.asarray(img.convert("RGB")), framing)
    return img if box is None else img.crop(box)


def frame_array(a: np.ndarray, framing: dict, box: tuple | None | str = "find") -> np.ndarray:
    """The same for a uint8 HWC array, resized back to *a*'s size (so that every photo of a
    batch keeps one size); *box*: the crop if already found (None: none)."""
    box = window_box(a, framing) if box == "find" else box
    if box is None:
        return a
    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(a).crop(box).resize((w, h), Image.Resampling.BILINEAR))
