"""Issue 15 acceptance 3: a running worker picks up a newly activated model; rollback works."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from db.engine import session_scope
from db.service import list_results
from producer.submit import submit_bytes, wait_for_job
from sortline.cli import cli
from tests.support.fixtures import jpeg_bytes, tiny_checkpoint
from training.config import DEFAULT_CHECKPOINT
from training.fit.run import register
from training.model.checkpoint import read_metadata

pytestmark = pytest.mark.integration


def _versions_of_next_job(n: int = 4) -> set[str]:
    job_id = submit_bytes([jpeg_bytes(i) for i in range(n)], batch_size=2)
    job = wait_for_job(job_id, timeout=90)
    assert (job.done, job.failed) == (n, 0)
    with session_scope() as s:
        return {r.model_version for r in list_results(s, job_id=job_id)}


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_activation_reaches_a_running_worker_and_rollback_restores(make_worker, tmp_path):
    # two candidates better than the shipped model on val, the second better than the first
    for seed, f1 in ((1, 0.95), (2, 0.96)):
        ckpt = tiny_checkpoint(
            tmp_path / f"v{seed}.safetensors",
            seed=seed,
            metrics={"val": {"macro_f1": f1, "accuracy": f1}},
        )
        assert register(ckpt) == f"tiny-test:{seed}"
    out = _cli("models", "activate", "tiny-test:1")
    assert out.exit_code == 0 and "tiny-test:1 is the active model" in out.output, out.output

    worker = make_worker(env={"SORTLINE_MODEL": "", "SORTLINE_MODEL_CHECK_INTERVAL": "0"})
    pool = worker.children()
    assert _versions_of_next_job() == {"tiny-test:1"}

    assert _cli("models", "activate", "tiny-test:2").exit_code == 0
    assert _versions_of_next_job() == {"tiny-test:2"}  # no restart

    # the rollback to the weaker version is refused without --force, then done
    out = _cli("models", "activate", "tiny-test:1")
    assert out.exit_code == 1 and "below the active tiny-test:2's 0.960; --force" in out.output
    assert _versions_of_next_job() == {"tiny-test:2"}
    assert _cli("models", "activate", "tiny-test:1", "--force").exit_code == 0
    assert _versions_of_next_job() == {"tiny-test:1"}

    assert worker.proc.poll() is None and worker.children() == pool  # the same processes
    listing = _cli("models").output.splitlines()
    assert [line.split()[1] for line in listing if line.startswith("*")] == ["tiny-test:1"]
    shipped = read_metadata(DEFAULT_CHECKPOINT)["version"]
    assert any(f"sortline-trashnet:{shipped}" in line for line in listing)  # the shipped model
