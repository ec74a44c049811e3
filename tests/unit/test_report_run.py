"""`sortline report --run`: a run folder's page and the comparison of runs, missing files and all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.support.fixtures import CLASSES
from training.reports.run import RunError, run_report


def _split(acc: float, n: int = 60) -> dict:
    k = len(CLASSES)
    conf = [[n // k if i == j else 0 for j in range(k)] for i in range(k)]
    per = {c: {"precision": acc, "recall": acc, "f1": acc, "support": n // k} for c in CLASSES}
    return {
        "n": n,
        "accuracy": acc,
        "macro_f1": acc - 0.01,
        "ece": 0.03,
        "per_class": per,
        "confusion": conf,
    }


def make_run(root: Path, name: str, acc: float, *, full: bool = True) -> Path:
    """A run folder as `sortline train` writes it (without its PNGs and checkpoint)."""
    d = root / name
    d.mkdir(parents=True)
    test = {
        **_split(acc),
        "intervals": {
            "level": 0.95,
            "resamples": 1000,
            "accuracy": [0.61, 0.97],
            "macro_f1": [0.5, 0.9],
            "per_class_f1": {"glass": [0.4, 1.0]},
        },
    }
    metrics = {
        "val": _split(acc + 0.01),
        "test": test,
        "calibration": {
            "split": "val",
            "temperature": 1.2,
            "ece_before": 0.05,
            "ece_after": 0.02,
            "nll_before": 0.4,
            "nll_after": 0.35,
        },
        "test_robustness": {
            "mean_corrupted": {"accuracy": acc - 0.1, "macro_f1": 0.5},
            "per_corruption": {"blur": {"accuracy": 0.7, "macro_f1": 0.6}},
        },
    }
    if not full:  # an older or partial run: only the summary
        (d / "summary.json").write_text(json.dumps({"metrics": metrics, "seconds": 12.5}))
        return d
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "history.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,val_macro_f1,seconds\n"
        "1,1.2,0.5,1.0,0.6,0.55,3.0\n2,0.8,0.7,0.7,0.75,0.7,3.1\n"
    )
    (d / "classification_report.txt").write_text("test split\n  glass 0.9\n")
    counts = {sp: {c: 5 for c in CLASSES} for sp in ("train", "val", "test")}
    (d / "manifest.json").write_text(
        json.dumps(
            {
                "classes": CLASSES,
                "counts": counts,
                "duplicate_groups": 3,
                "skipped": [],
                "manifest_sha256": "ab" * 32,
                "samples": [],
            }
        )
    )
    return d


def test_run_page_renders_what_the_folder_holds(tmp_path):
    run = make_run(tmp_path, "r1", 0.8)
    page = run_report(run, tmp_path / "out")
    html = page.read_text()
    assert page.name == "run.html"
    assert (tmp_path / "out" / "curves.png").exists()  # drawn from history.csv
    assert (tmp_path / "out" / "confusion_matrix.png").exists()  # drawn from metrics.json
    assert html.count("data:image/png;base64,") == 2
    for text in (
        "0.800",
        "Robustness",
        "blur",
        "Data split",
        "test split",
        "temperature",
        "bootstrap 95% intervals (1000 resamples): accuracy [0.61, 0.97]",
    ):
        assert text in html or text.lower() in html.lower(), text
    assert "No model.safetensors" in html


def test_run_page_tolerates_a_partial_run_and_refuses_a_non_run(tmp_path, tiny_model):
    run = make_run(tmp_path, "partial", 0.7, full=False)
    (run / "model.safetensors").write_bytes(tiny_model.read_bytes())
    html = run_report(run, tmp_path / "out").read_text()
    assert "0.700" in html and "tiny-test:0" in html
    assert html.count("data:image/png;base64,") == 1  # no history: no curves
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no run files"):
        run_report(tmp_path / "empty", tmp_path / "o2")


def test_compare_runs_table_and_confusion_matrices_side_by_side(tmp_path):
    runs = [make_run(tmp_path, f"aug-{a}", acc) for a, acc in (("none", 0.8), ("flip", 0.85))]
    runs.append(make_run(tmp_path, "old", 0.75, full=False))
    r = CliRunner().invoke(
        cli, ["report", *sum((["--run", str(d)] for d in runs), []), "--out", str(tmp_path / "cmp")]
    )
    assert r.exit_code == 0, r.output
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Best test accuracy: aug-flip (0.850)" in html
    assert html.count('<div class="row">') == 1
    assert html.count("data:image/png;base64,") == 4  # accuracy chart + 3 matrices
    for name in ("aug-none", "aug-flip", "old"):
        assert f'<td class="l">{name}</td>' in html
    bad = CliRunner().invoke(cli, ["report", "--run", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "holds no run files" in bad.output


def test_report_and_review_modules_do_not_import_torch():
    code = (
        "import sys, producer.report, producer.review, sortline.commands.report, "
        "sortline.commands.review, training.reports.run, training.reports.eda, training.reports.charts; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
