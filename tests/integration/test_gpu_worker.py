"""GPU workers: CUDA (or torch at all) is never loaded in the parent; no GPU -> CPU with a warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.submit import submit_paths, wait_for_job
from tests.support.fixtures import write_images

pytestmark = pytest.mark.integration


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_gpu_queue_worker_loads_torch_only_in_the_child(make_worker, tmp_path):
    import torch

    w = make_worker(queues="gpu", env={"SORTLINE_DEVICE": "cuda"})
    job_id = submit_paths(write_images(tmp_path / "g", 5), queue="gpu")
    job = wait_for_job(job_id, timeout=60)
    assert (job.done, job.queue) == (5, "gpu")
    children = w.children()
    assert children and any(_loads_torch(pid) for pid in children)  # the model lives in the child
    assert not _loads_torch(w.proc.pid)  # the parent never imported torch, let alone CUDA
    if not torch.cuda.is_available():
        assert "falling back to the CPU" in w.log.read_text()
