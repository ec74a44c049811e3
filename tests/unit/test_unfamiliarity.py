"""The unfamiliarity score: fitted on train features, 5% of val flagged, in the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.fixtures import CLASSES, jpeg_bytes
from training.model import unfamiliarity


def _blobs(rng: np.random.Generator, n: int, shift: float = 0.0):
    centres = np.eye(6, 16) * 6
    y = rng.integers(0, 6, n)
    return centres[y] + rng.standard_normal((n, 16)) + shift, y


def test_threshold_flags_about_5_percent_of_val_and_most_shifted_points():
    rng = np.random.default_rng(0)
    train_x, train_y = _blobs(rng, 3000)
    val_x, _ = _blobs(rng, 2000)
    stats, thr = unfamiliarity.fit(train_x, train_y, val_x)
    assert (unfamiliarity.score(val_x, stats) > thr).mean() == pytest.approx(0.05, abs=0.002)
    test_x, _ = _blobs(rng, 2000)
    assert (unfamiliarity.score(test_x, stats) > thr).mean() == pytest.approx(0.05, abs=0.02)
    far_x, _ = _blobs(rng, 500, shift=3.0)
    assert (unfamiliarity.score(far_x, stats) > thr).mean() > 0.9
    # the squared Mahalanobis distance of a class mean to itself is zero
    assert unfamiliarity.score(np.eye(6, 16)[:1] * 6, stats)[0] == pytest.approx(0, abs=0.05)


def test_the_shift_detector_flags_a_shift_the_gaussians_miss_at_5_percent_of_val():
    rng = np.random.default_rng(1)
    train_x, train_y = _blobs(rng, 3000)
    val_x, _ = _blobs(rng, 2000)
    # a "relit" copy: a small offset along the ten features no class uses
    light = np.r_[np.zeros(6), np.ones(10)]
    shifted_train = train_x + light
    plain, plain_thr = unfamiliarity.fit(train_x, train_y, val_x)
    both, thr = unfamiliarity.fit(train_x, train_y, val_x, shifted_x=shifted_train)
    assert thr == 1.0 and unfamiliarity.method(both) == "mahalanobis+shift-detector"
    assert (unfamiliarity.score(val_x, both) > thr).mean() == pytest.approx(0.05, abs=0.005)
    relit, _ = _blobs(rng, 1000)
    relit += light
    assert (unfamiliarity.score(relit, plain) > plain_thr).mean() < 0.6
    assert (unfamiliarity.score(relit, both) > thr).mean() > 0.8
    # a reused detector (adapt keeps the base backbone's) scores the same way
    again, _ = unfamiliarity.fit(train_x, train_y, val_x, detector=both)
    assert np.allclose(unfamiliarity.score(relit, again), unfamiliarity.score(relit, both))


def test_the_shift_temperature_softens_only_unfamiliar_looking_images():
    from training.model.calibration import calibrated, fit_shift_slope, softmax, temperatures

    logits = np.array([[4.0, 0, 0], [4.0, 0, 0], [4.0, 0, 0]])
    meta = {"temperature": 2.0, "unfamiliarity": {"shift_slope": 1.0}}
    p = calibrated(logits, np.array([-1.0, np.nan, 2.0]), meta)
    assert np.allclose(p[0], softmax(logits[:1], 2.0)) and np.allclose(p[1], p[0])
    assert np.allclose(p[2], softmax(logits[:1], 6.0))  # 2 * (1 + 1 * 2)
    assert np.allclose(calibrated(logits, None, meta), softmax(logits, 2.0))
    assert temperatures(np.array([3.0]), 1.5, 0.0) == 1.5
    # shifted images that are right only half the time at confidence ~0.98: a positive slope
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    clean = np.eye(3)[y] * 4
    wrong = np.eye(3)[(y + rng.integers(0, 2, 400)) % 3] * 4
    scores = np.r_[np.zeros(400), np.full(400, 2.0)]
    slope = fit_shift_slope(np.r_[clean, wrong], np.r_[y, y], scores, 1.0)
    assert slope > 0.5


@pytest.fixture(scope="module")
def scored_tiny(tmp_path_factory):
    """A tiny checkpoint with statistics, its training images' features and statistics."""
    from tests.support.fixtures import tiny_checkpoint
    from training.data.features import extract
    from training.model.checkpoint import load_checkpoint, preprocess_spec, read_unfamiliarity
    from training.model.imaging import decode_image

    path = tiny_checkpoint(tmp_path_factory.mktemp("u") / "s.safetensors", unfamiliarity=True)
    model, meta = load_checkpoint(path)
    imgs = [np.asarray(decode_image(jpeg_bytes(i))) for i in range(8)]
    feats = extract(model, imgs, preprocess_spec(meta))
    return path, feats, read_unfamiliarity(path), meta["unfamiliarity"]["threshold"]


def test_checkpoint_round_trip_and_both_runtimes_compute_the_score(scored_tiny):
    from training.model.checkpoint import load_checkpoint
    from training.model.preprocess import load_and_preprocess
    from worker.runtime import Classifier

    path, feats, stats, thr = scored_tiny
    assert set(stats) == {"whiten", "means", "det_w", "det_b", "norm"}
    assert stats["means"].shape == (6, feats.shape[1])
    load_checkpoint(path)  # the statistics are not weights: loading still fits the network
    onnx = Classifier(path, runtime="onnx", device="cpu")
    torch_ = Classifier(path, runtime="torch", device="cpu")
    assert onnx.unfamiliar_threshold == pytest.approx(thr)
    batch = np.stack([load_and_preprocess(jpeg_bytes(i), onnx.spec) for i in range(8)])
    expected = unfamiliarity.score(feats[:8], stats)
    for clf in (onnx, torch_):
        out = clf.predict(batch)
        assert out.shape == (8, len(CLASSES) + 1)
        assert np.allclose(out[:, :-1].sum(1), 1, atol=1e-5)
        assert np.allclose(out[:, -1], expected, rtol=1e-3, atol=1e-3)
    # the probabilities are the shift-aware calibration of the logits
    from training.model.calibration import calibrated

    logits = torch_.backend.outputs(batch)[0]
    assert np.allclose(torch_.predict(batch)[:, :-1], calibrated(logits, expected, torch_.meta),
                       atol=1e-4)  # fmt: skip


def test_the_threshold_setting_overrides_the_checkpoints(scored_tiny, monkeypatch):
    from worker.runtime import Classifier

    monkeypatch.setenv("SORTLINE_UNFAMILIAR_THRESHOLD", "123.5")
    assert Classifier(scored_tiny[0], runtime="torch").unfamiliar_threshold == 123.5
