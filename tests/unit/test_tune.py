"""Optuna studies in process on SQLite: storage choice, search spaces, pruners, the slot
accounting of one trial per call, the status table, plots, and `train --from-study`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.unit.test_training import make_imagefolder


@pytest.fixture(autouse=True)
def _fresh_settings():
    from db.config import clear_settings

    clear_settings()
    yield
    clear_settings()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("tune") / "data", per_class=8)


@pytest.fixture
def env(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("SORTLINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SORTLINE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("SORTLINE_TUNE_STORAGE", raising=False)
    return sqlite_url


def test_storage_is_the_database_unless_set(monkeypatch):
    from db.config import clear_settings
    from training.tune.storage import storage_url

    monkeypatch.setenv("SORTLINE_DATABASE_URL", "postgresql://u:pw@db/sortline")
    monkeypatch.delenv("SORTLINE_TUNE_STORAGE", raising=False)
    assert storage_url() == "postgresql+psycopg://u:pw@db/sortline?options=-csearch_path%3Doptuna"
    monkeypatch.setenv("SORTLINE_DATABASE_URL", "sqlite:////data/sortline.db")
    clear_settings()
    assert storage_url() == "sqlite:////data/sortline-optuna.db"
    monkeypatch.setenv("SORTLINE_TUNE_STORAGE", "sqlite:///studies.db")
    clear_settings()
    assert storage_url() == "sqlite:///studies.db"


@pytest.mark.parametrize("parallel", [0, 2])
def test_sqlite_refused_for_parallel_trials(parallel):
    from training.tune.storage import check_parallel
    from training.tune.study import TuneError

    with pytest.raises(TuneError) as e:
        check_parallel("sqlite:///x.db", parallel)
    msg = str(e.value)
    assert "SQLite" in msg and "database is locked" in msg
    assert "PostgreSQL" in msg and "--parallel 1" in msg
    check_parallel("sqlite:///x.db", 1)
    check_parallel("postgresql+psycopg://h/db", 0)


def test_cli_refuses_sqlite_for_parallel_trials(env, data):
    r = CliRunner().invoke(
        cli, ["tune", "--study", "s", "--data", str(data), "--arch", "tiny", "--parallel", "2"]
    )
    assert r.exit_code == 1 and "SQLite" in r.output and "PostgreSQL" in r.output
    assert "Traceback" not in r.output


def test_pruners():
    import optuna

    from training.tune.study import TuneError, make_pruner

    assert isinstance(make_pruner("median", 15), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("percentile", 15), optuna.pruners.PercentilePruner)
    assert isinstance(make_pruner("hyperband", 15), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", 15), optuna.pruners.NopPruner)
    with pytest.raises(TuneError, match="unknown pruner"):
        make_pruner("asha", 15)


def test_search_spaces_have_stable_names():
    import optuna

    from training.tune.spaces import frozen_params, suggest_finetune, suggest_frozen
    from training.tune.study import StudyConfig

    fixed = {"lr": 0.01, "weight_decay": 1e-4, "batch_size": 64, "step_size": 5, "gamma": 0.5}
    assert suggest_frozen(optuna.trial.FixedTrial(fixed)) == fixed
    p = frozen_params(StudyConfig(data="."), fixed)
    assert (p.lr, p.batch_size, p.epochs) == (0.01, 64, 15)
    ft = {
        "lr": 1e-3,
        "backbone_lr_mult": 0.1,
        "weight_decay": 0.01,
        "label_smoothing": 0.1,
        "epochs": 4,
        "augment": "robust",
    }
    assert suggest_finetune(optuna.trial.FixedTrial(ft), max_epochs=10) == ft


def test_trials_fill_the_requested_slots_and_no_more(env, data, tmp_path):
    """One call runs at most one trial; once N trials finished, calls do nothing."""
    from training.tune.runner import create_or_resume, load_study, run_one_trial
    from training.tune.status import save_plots, state_counts, status_text
    from training.tune.study import StudyConfig, TuneError

    conf = StudyConfig(data=str(data), arch="tiny", trials=3, epochs=4, pretrained="none")
    create_or_resume("slots", conf)
    outcomes = [run_one_trial("slots", worker="w1") for _ in range(4)]
    assert [o["status"] for o in outcomes] == ["ran", "ran", "ran", "done"]
    study = load_study("slots")
    c = state_counts(study)
    assert c["finished"] == 3 and c["RUNNING"] == c["WAITING"] == 0
    text = status_text(study)
    assert f"best: trial {study.best_trial.number} value {study.best_value:.4f}" in text
    assert text.count(" w1 ") == 3
    pngs = save_plots(study, tmp_path / "plots")
    assert {p.name for p in pngs} == {"optimization_history.png", "param_importances.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    # resuming asks for more trials; another architecture is refused
    create_or_resume("slots", StudyConfig(**{**conf.__dict__, "trials": 4}))
    assert run_one_trial("slots")["status"] == "ran"
    assert run_one_trial("slots")["status"] == "done"
    with pytest.raises(TuneError, match="another configuration"):
        create_or_resume("slots", StudyConfig(**{**conf.__dict__, "mode": "finetune"}))


def test_a_killed_trial_is_failed_and_retried_once(env, data, monkeypatch):
    """A RUNNING trial whose heartbeat stopped becomes FAIL and its retry takes its slot."""
    import time

    from db.config import clear_settings
    from training.tune.runner import create_or_resume, load_study, run_one_trial
    from training.tune.status import state_counts
    from training.tune.storage import make_storage
    from training.tune.study import StudyConfig

    monkeypatch.setenv("SORTLINE_TUNE_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SORTLINE_TUNE_GRACE_PERIOD", "1")
    clear_settings()
    conf = StudyConfig(data=str(data), arch="tiny", trials=2, epochs=3, pretrained="none")
    study = create_or_resume("killed", conf)
    # a worker that asked, beat once and died
    dead = study.ask()
    dead.suggest_float("lr", 1e-4, 1e-1, log=True)
    dead.set_user_attr("worker", "dead@host")
    make_storage().record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    # 2 slots: the retry of the dead trial, then one new trial; then nothing
    assert run_one_trial("killed", worker="live")["status"] == "ran"
    assert run_one_trial("killed", worker="live")["status"] == "ran"
    assert run_one_trial("killed", worker="live")["status"] == "done"
    study = load_study("killed")
    c = state_counts(study)
    assert (c["finished"], c["FAIL"], c["errors"]) == (2, 1, 0)
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert retry[0].params["lr"] == study.trials[dead.number].params["lr"]


def test_parallel_limit_makes_the_task_wait(env, data):
    from training.tune.runner import create_or_resume, run_one_trial
    from training.tune.study import StudyConfig

    conf = StudyConfig(data=str(data), arch="tiny", trials=3, epochs=2, pretrained="none")
    study = create_or_resume("limit", conf)
    study.ask()  # someone else's running trial (no heartbeat yet)
    out = run_one_trial("limit")
    assert out["status"] == "wait" and out["retry_in"] >= 1


def test_finetune_trial(env, data):
    from training.tune.runner import create_or_resume, load_study, run_one_trial
    from training.tune.study import StudyConfig

    conf = StudyConfig(
        data=str(data), arch="tiny", mode="finetune", trials=1, epochs=3, pretrained="none"
    )
    create_or_resume("ft", conf)
    out = run_one_trial("ft", worker="w")
    assert out["status"] == "ran" and out["state"] in ("COMPLETE", "PRUNED"), out
    t = load_study("ft").trials[0]
    assert set(t.params) == {
        "lr",
        "backbone_lr_mult",
        "weight_decay",
        "label_smoothing",
        "epochs",
        "augment",
    }
    assert len(t.intermediate_values) == t.params["epochs"]


def test_train_from_study_uses_the_best_trial_and_records_it(env, data, tmp_path):
    from training.model.checkpoint import read_metadata
    from training.tune.runner import create_or_resume, load_study, run_one_trial
    from training.tune.study import StudyConfig

    conf = StudyConfig(data=str(data), arch="tiny", trials=2, epochs=3, pretrained="none")
    create_or_resume("final", conf)
    run_one_trial("final")
    run_one_trial("final")
    best = load_study("final").best_trial
    r = CliRunner().invoke(cli, ["train", "--from-study", "final", "--arch", "tiny"])
    assert r.exit_code == 2 and "--arch" in r.output
    out = tmp_path / "final-run"
    r = CliRunner().invoke(
        cli, ["train", "--from-study", "final", "--out", str(out), "--no-robustness"]
    )
    assert r.exit_code == 0, r.output
    assert f"best trial {best.number}" in r.output and "registered as" in r.output
    meta = read_metadata(out / "model.safetensors")
    origin = meta["training"]["study"]
    assert (origin["name"], origin["trial"], origin["value"]) == ("final", best.number, best.value)
    assert meta["training"]["frozen"]["lr"] == best.params["lr"]
    assert meta["training"]["frozen"]["epochs"] == 3 and meta["arch"] == "tiny"
    # acceptance: the best trial's parameters reproduce its validation macro-F1 within 0.01
    val_f1 = json.loads((out / "metrics.json").read_text())["val"]["macro_f1"]
    assert abs(val_f1 - best.value) <= 0.01, (val_f1, best.value)
    r = CliRunner().invoke(cli, ["train", "--from-study", "nosuch", "--out", str(out)])
    assert r.exit_code == 1 and "no study 'nosuch'" in r.output


def test_status_command(env, data, tmp_path):
    import json

    from training.tune.runner import create_or_resume, run_one_trial
    from training.tune.study import StudyConfig

    create_or_resume(
        "st", StudyConfig(data=str(data), arch="tiny", trials=2, epochs=2, pretrained="none")
    )
    run_one_trial("st", worker="w9")
    run_one_trial("st", worker="w9")
    r = CliRunner().invoke(cli, ["tune", "status", "st", "--plots", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "2/2 finished" in r.output and "best: trial" in r.output
    assert (tmp_path / "p" / "optimization_history.png").exists()
    r = CliRunner().invoke(cli, ["tune", "status", "st", "--json"])
    doc = json.loads(r.output)
    assert len(doc["trials"]) == 2 and doc["best"]["value"] == max(
        t["value"] for t in doc["trials"] if t["state"] == "COMPLETE"
    )
    r = CliRunner().invoke(cli, ["tune", "status", "nosuch"])
    assert r.exit_code == 1 and "no study 'nosuch'" in r.output


def test_tune_names_its_metric_lists_studies_and_keeps_optuna_quiet(env, data, tmp_path):
    """No Optuna log line or warning reaches the CLI's output; `tune list` names the metric."""
    import os
    import subprocess
    import sys

    import redis

    from tests.support.services import REPO

    broker = os.environ["SORTLINE_BROKER_URL"].rsplit("/", 1)[0] + "/9"  # trials sent nowhere
    run_env = {**os.environ, "SORTLINE_BROKER_URL": broker, "PYTHONWARNINGS": "default"}

    def sortline(*args):
        out = subprocess.run(
            [sys.executable, "-m", "sortline.cli", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=run_env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out

    try:
        made = sortline(
            "tune",
            "--study",
            "quiet",
            "--data",
            str(data),
            "--arch",
            "tiny",
            "--trials",
            "2",
            "--epochs",
            "1",
            "--pretrained",
            "none",
        )
    finally:
        redis.from_url(broker).flushdb()
    listed = sortline("tune", "list")
    status = sortline("tune", "status", "quiet")
    for out in (made, listed, status):
        # no "[I ...] A new study created in RDB", no ExperimentalWarning
        assert "optuna" not in out.stderr.lower() and "Warning:" not in out.stderr, out.stderr
    assert "2 sent to the training queue" in made.stdout
    head, row = listed.stdout.splitlines()
    assert head.split() == ["study", "metric", "trials", "best", "started"]
    assert row.split()[:4] == ["quiet", "val_macro_f1", "0", "-"]
    as_json = json.loads(sortline("tune", "list", "--json").stdout)
    assert [(s["name"], s["metric"], s["direction"]) for s in as_json] == [
        ("quiet", "val_macro_f1", "maximize")
    ]
