"""Optuna trials as Celery tasks: two real training worker processes on the real PostgreSQL
and Redis share one study; a worker killed with SIGKILL mid-trial is failed and retried."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.support.servers import private_broker
from tests.support.services import CeleryWorker, create_pg_database, drop_pg_database, wait_until
from tests.unit.test_training import make_imagefolder

pytestmark = pytest.mark.integration


@pytest.fixture
def pg(tmp_path, monkeypatch):
    """A fresh PostgreSQL database holding sortline's tables; the study goes beside them."""
    from db.config import clear_settings
    from db.migrate import upgrade

    url = create_pg_database()
    upgrade(url)
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    monkeypatch.setenv("SORTLINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SORTLINE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("SORTLINE_TUNE_STORAGE", raising=False)
    clear_settings()
    yield url
    from db.engine import reset_engines

    reset_engines()
    drop_pg_database(url)


@pytest.fixture
def data(tmp_path):
    return make_imagefolder(tmp_path / "data", per_class=8)


@pytest.fixture
def broker(tmp_path, monkeypatch):
    """A redis-server of this test's own: no worker or flush of another test run interferes."""
    with private_broker(tmp_path / "redis", monkeypatch) as server:
        yield server


@pytest.fixture
def workers(pg, broker, tmp_path):
    started: list[CeleryWorker] = []

    def start(n: int, **env) -> list[CeleryWorker]:
        base = {
            "SORTLINE_DATABASE_URL": pg,
            "SORTLINE_CACHE_DIR": str(tmp_path / "cache"),
            "SORTLINE_BROKER_URL": broker.url,
        }
        for _ in range(n):
            w = CeleryWorker(
                {**base, **env},
                queues="training",
                concurrency=1,
                log=tmp_path / f"worker-{len(started)}.log",
            )
            started.append(w)
        for w in started[-n:]:
            w.start()
        return started[-n:]

    yield start
    for w in started:
        w.stop()


def _interval(t):
    return t.datetime_start, t.datetime_complete or datetime.max


def test_two_workers_run_trials_of_one_study_concurrently(pg, data, workers, tmp_path):
    from training.tune.runner import load_study

    a, b = workers(2)
    r = CliRunner().invoke(
        cli,
        [
            "tune",
            "--study",
            "par",
            "--data",
            str(data),
            "--arch",
            "tiny",
            "--pretrained",
            "none",
            "--mode",
            "frozen",
            "--trials",
            "6",
            "--epochs",
            "40",
            "--parallel",
            "2",
            "--wait",
            "--plots",
            str(tmp_path / "plots"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "6/6 trials done" in r.output

    study = load_study("par")
    trials = study.trials
    assert len(trials) == 6
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    by = {t.user_attrs["worker"] for t in trials}
    assert by == {a.hostname, b.hostname}
    overlapping = [
        (s, t)
        for s in trials
        for t in trials
        if s.number < t.number
        and s.user_attrs["worker"] != t.user_attrs["worker"]
        and _interval(s)[0] < _interval(t)[1]
        and _interval(t)[0] < _interval(s)[1]
    ]
    assert overlapping, [(t.number, t.user_attrs["worker"], _interval(t)) for t in trials]
    assert (tmp_path / "plots" / "optimization_history.png").exists()

    # the table shows the study's best value
    r = CliRunner().invoke(cli, ["tune", "status", "par"])
    assert r.exit_code == 0, r.output
    best = re.search(r"^best: trial (\d+) value ([0-9.]+)", r.output, re.M)
    assert best, r.output
    assert int(best.group(1)) == study.best_trial.number
    assert best.group(2) == f"{study.best_value:.4f}"
    rows = re.findall(r"^\s+(\d+)\s+(COMPLETE|PRUNED)\s+([0-9.]+)", r.output, re.M)
    assert len(rows) == 6
    assert max(float(v) for _, s, v in rows if s == "COMPLETE") == float(best.group(2))


def test_killed_worker_trial_fails_and_is_retried(pg, data, workers, tmp_path):
    """SIGKILL mid-trial: that trial ends FAIL, a retry with its parameters runs, and the
    study ends with exactly the requested 4 finished (COMPLETE or PRUNED) trials, even after
    the killed task's message comes back (acks_late) and runs again."""
    from training.tune.runner import load_study
    from training.tune.status import state_counts

    env = {
        "SORTLINE_VISIBILITY_TIMEOUT": "10",
        "SORTLINE_TUNE_HEARTBEAT_INTERVAL": "2",
        "SORTLINE_TUNE_GRACE_PERIOD": "6",
    }
    a, b = workers(2, **env)
    r = CliRunner().invoke(
        cli,
        [
            "tune",
            "--study",
            "kill",
            "--data",
            str(data),
            "--arch",
            "tiny",
            "--pretrained",
            "none",
            "--trials",
            "4",
            "--epochs",
            "400",
            "--pruner",
            "none",
        ],
    )
    assert r.exit_code == 0, r.output
    study = load_study("kill")

    def running_on_a():
        return next(
            (
                t
                for t in study.get_trials(deepcopy=False)
                if t.state.name == "RUNNING"
                and t.user_attrs.get("worker") == a.hostname
                and t.intermediate_values  # training, epochs reported
            ),
            None,
        )

    victim = wait_until(running_on_a, timeout=90, interval=0.1)
    a.kill()

    def finished():
        c = state_counts(study)
        return c if c["finished"] >= 4 and not c["RUNNING"] and not c["WAITING"] else None

    wait_until(finished, timeout=150, interval=0.5)
    # the killed task's message is redelivered (visibility timeout) and finds nothing to do
    task_id = study.trials[victim.number].user_attrs["task_id"]
    wait_until(lambda: f"run_trial[{task_id}] succeeded" in b.log.read_text(), timeout=60)

    trials = study.get_trials(deepcopy=False)
    c = state_counts(study)
    assert c["finished"] == 4 and c["FAIL"] == 1 and c["errors"] == 0, c
    dead = trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["worker"] == a.hostname
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    assert retries[0].state.name in ("COMPLETE", "PRUNED")
    assert retries[0].params == dead.params
    assert retries[0].user_attrs["worker"] == b.hostname
    assert len(trials) == 5
    r = CliRunner().invoke(cli, ["tune", "status", "kill"])
    assert f"(retry of #{victim.number})" in r.output


def test_readme_dashboard_command_opens_the_study_on_postgresql(pg, tmp_path):
    """The README's `optuna-dashboard "postgresql+psycopg://...?options=-csearch_path%3Doptuna"`."""
    pytest.importorskip("optuna_dashboard", reason="pip install optuna-dashboard")
    import json
    import shutil
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    import optuna
    from sqlalchemy.engine import make_url

    from tests.support.servers import free_port
    from training.tune.status import list_studies
    from training.tune.storage import make_storage
    from training.tune.study import OBJECTIVE, quiet_optuna

    quiet_optuna()
    study = optuna.create_study(study_name="dash", storage=make_storage(), direction="maximize")
    study.set_metric_names([OBJECTIVE])
    assert list_studies()[0]["metric"] == OBJECTIVE

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = re.search(r'^optuna-dashboard "(postgresql\+psycopg://[^"]+)"$', readme, re.M).group(1)
    u = make_url(pg)
    url = line.replace("user:pass@host:5432", f"{u.username}@{u.host}:{u.port or 5432}").replace(
        "/sortline?", f"/{u.database}?"
    )
    port = free_port()
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [exe, url, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    return json.load(r)["study_summaries"]
            except OSError:
                return None

        found = wait_until(studies, timeout=60)
    finally:
        proc.terminate()
        proc.wait(10)
    assert [s["study_name"] for s in found] == ["dash"]
