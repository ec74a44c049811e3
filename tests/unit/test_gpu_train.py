"""bench/gpu_train.sh on the CPU with the tiny network: teachers, distilled student, budget."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.test_training import make_imagefolder

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.sh"
BUDGET = 90


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gpu-train")
    data = make_imagefolder(root / "data", per_class=4)
    out = root / "out"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            str(SCRIPT),
            str(out),
            str(BUDGET),
            "--tiny",
            "--data",
            str(data),
            "--device",
            "cpu",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=BUDGET + 30,
    )
    return {"run": r, "out": out, "seconds": time.perf_counter() - t0}


def test_every_stage_writes_its_run_folder(smoke):
    r, out = smoke["run"], smoke["out"]
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu_train.json").read_text())
    assert set(report["stages"]) == {"teacher-tiny-32-s0", "teacher-tiny-40-s1", "student-tiny-32"}
    for name, stage in report["stages"].items():
        assert (out / name / "model.safetensors").is_file() and (
            out / name / "metrics.json"
        ).is_file()
        assert stage["ran_on"].startswith("cpu") and stage["epochs_run"] >= 1
        ci = stage["test"]["intervals"]
        assert ci["accuracy"][0] <= stage["test"]["accuracy"] <= ci["accuracy"][1]


def test_the_student_is_distilled_from_the_finished_teachers(smoke):
    from training.model.checkpoint import read_metadata

    out = smoke["out"]
    meta = read_metadata(out / "student-tiny-32" / "model.safetensors")
    assert [Path(t).name for t in meta["training"]["teachers"]] == [
        "teacher-tiny-32-s0",
        "teacher-tiny-40-s1",
    ]
    assert "test_robustness" in meta["metrics"]


def test_progress_is_printed_and_the_budget_kept(smoke):
    r = smoke["run"]
    lines = r.stdout.splitlines()
    assert sum(" epoch " in x for x in lines) >= 3
    assert "all stages done" in lines[-1]
    assert smoke["seconds"] < BUDGET


def test_usage_line_without_an_output_folder():
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("usage: bench/gpu_train.sh OUT_DIR")
