"""A site's framing: site photos cropped around their object, any other photo unchanged."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.model import framing
from training.model.preprocess import PreprocessSpec, preprocess


def _floor(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    """A dim grey floor with a little noise (a site's)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(90, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _site_photo(top: int, left: int, seed: int = 0) -> np.ndarray:
    a = _floor(seed=seed)
    a[top : top + 40, left : left + 50] = (200, 40, 40)  # a small red object
    return a


def _fitted(window: float = 0.5) -> dict:
    floors = [_floor(64, 64, seed=s) for s in range(4)]
    return framing.fit(floors, window)


def test_a_site_photo_is_cropped_around_its_object_to_the_window():
    fr = _fitted(0.5)
    a = _site_photo(top=220, left=300)  # near the bottom-right corner
    box = framing.window_box(a, fr)
    assert box is not None
    left, top, right, bottom = box
    assert (right - left, bottom - top) == (200, 150)  # half the frame's sides
    assert left <= 300 and right >= 350 and top <= 220 and bottom >= 260  # the object inside
    out = framing.frame(Image.fromarray(a), fr)
    assert out.size == (200, 150)
    arr = framing.frame_array(a, fr)
    assert arr.shape == a.shape and not np.array_equal(arr, a)  # cropped, resized back


def test_a_photo_that_is_not_the_sites_passes_unchanged():
    fr = _fitted(0.5)
    board = np.full((300, 400, 3), 245, np.uint8)  # a TrashNet-like white board
    board[120:180, 150:250] = (40, 120, 200)
    assert framing.window_box(board, fr) is None
    assert framing.frame_array(board, fr) is board
    empty = _floor(seed=7)  # the site's floor, no object on it
    assert framing.window_box(empty, fr) is None
    assert framing.window_box(_site_photo(100, 100), {**fr, "window": 1.0}) is None


def test_preprocess_applies_a_checkpoints_framing():
    fr = _fitted(0.5)
    plain = PreprocessSpec(resize=64, crop=56)
    framed = PreprocessSpec(resize=64, crop=56, extra={"framing": fr})
    site = Image.fromarray(_site_photo(top=220, left=300))
    board = Image.fromarray(np.full((300, 400, 3), 245, np.uint8))
    assert not np.array_equal(preprocess(site, framed), preprocess(site, plain))
    assert np.array_equal(preprocess(board, framed), preprocess(board, plain))
    # the spec round-trips through a checkpoint's metadata with its framing
    assert PreprocessSpec.from_dict(framed.to_dict()).extra["framing"] == fr
