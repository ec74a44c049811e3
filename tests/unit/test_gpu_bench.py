"""bench/gpu_bench.sh runs anywhere: on a machine without CUDA it skips what needs CUDA."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.services import REPO


def test_gpu_bench_runs_and_writes_its_figures(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run bench/gpu_bench.sh itself")
    out = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_bench.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "cuda False" in summary and "no CUDA device: GPU figures skipped" in summary
    tests = (tmp_path / "out" / "gpu-tests.txt").read_text()
    assert "passed" not in tests.splitlines()[-1] and "skipped" in tests  # gpu tests skip
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "summary.txt",
        "versions.txt",
        "nvidia-smi.txt",
        "gpu-tests.txt",
        "gpu-bench.txt",
    }
