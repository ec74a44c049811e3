"""Bootstrap intervals of the test figures (training.reports.metrics, torch-free)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from training.reports.metrics import bootstrap_intervals, classification_metrics, with_interval

CLASSES = ["a", "b", "c"]


def _predictions(n: int, accuracy: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    wrong = rng.random(n) > accuracy
    return y, np.where(wrong, (y + 1) % 3, y)


def test_intervals_are_seeded_and_hold_the_point_estimate():
    y, p = _predictions(300, 0.9)
    a = bootstrap_intervals(y, p, CLASSES, seed=3)
    assert a == bootstrap_intervals(y, p, CLASSES, seed=3)
    assert a != bootstrap_intervals(y, p, CLASSES, seed=4)
    m = classification_metrics(y, p, CLASSES)
    assert a["accuracy"][0] < m["accuracy"] < a["accuracy"][1]
    assert a["macro_f1"][0] < m["macro_f1"] < a["macro_f1"][1]
    for c in CLASSES:
        lo, hi = a["per_class_f1"][c]
        assert lo < m["per_class"][c]["f1"] < hi
    assert (a["level"], a["resamples"]) == (0.95, 1000)


def test_each_resample_is_scored_like_classification_metrics():
    """One resample's figures equal classification_metrics on the same resampled images."""
    y, p = _predictions(50, 0.7, seed=1)
    for seed in range(5):
        idx = np.random.default_rng(seed).integers(0, len(y), size=(1, len(y)))[0]
        m = classification_metrics(y[idx], p[idx], CLASSES)
        one = bootstrap_intervals(y, p, CLASSES, resamples=1, seed=seed)
        assert one["accuracy"][0] == pytest.approx(m["accuracy"], abs=1e-4)
        assert one["macro_f1"][0] == pytest.approx(m["macro_f1"], abs=1e-4)
        for c in CLASSES:
            assert one["per_class_f1"][c][0] == pytest.approx(m["per_class"][c]["f1"], abs=1e-4)


def test_more_images_give_narrower_intervals():
    width = {}
    for n in (100, 2000):
        ci = bootstrap_intervals(*_predictions(n, 0.9), CLASSES)["accuracy"]
        width[n] = ci[1] - ci[0]
    assert width[2000] < width[100] / 2


def test_perfect_predictions_and_formatting():
    y = np.arange(30) % 3
    ci = bootstrap_intervals(y, y, CLASSES)
    assert ci["accuracy"] == [1.0, 1.0] and ci["macro_f1"] == [1.0, 1.0]
    assert with_interval(0.9412, [0.9152, 0.9657]) == "0.941 [0.915, 0.966]"
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_intervals([], [], CLASSES)


def test_metrics_module_never_imports_torch():
    code = (
        "import sys, training.reports.metrics as m; "
        "m.bootstrap_intervals([0, 1], [0, 1], ['a', 'b']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
