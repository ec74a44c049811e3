"""One study in SQL, one trial per Celery task: create or resume, run one trial, the final run.

The study is created once (:func:`create_or_resume`) with its configuration in the study's
user attributes: data folder, architecture, mode, pruner, epochs and the requested number of
trials. Each task calls :func:`run_one_trial`, which loads the study, asks for one trial,
trains (frozen mode: a linear head on cached backbone features, seconds per trial), reports
validation macro-F1 after each epoch so the pruner can stop it, and tells the result.

Killed workers: the storage records a heartbeat per running trial; a trial whose heartbeat
is older than the grace period is marked FAIL by the next task (``fail_stale_trials``) and a
retry callback queues a copy of it (same parameters) that the next ask picks up.

"The requested number of finished trials" is exact: a study asked for N trials ends with N
trials COMPLETE or PRUNED. Trials failed by a killed worker do not count (their retry takes
their place); trials failed by an error in training do (they are not re-run). The decision
"run a trial or not" and the ask itself happen under a per-study lock (a PostgreSQL advisory
lock, a file lock on SQLite), so a redelivered message never adds a trial.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.config import mask_url
from training.config import get_tune_settings
from training.tune.objectives import (
    objective_finetune,
    objective_frozen,
    prepare_features,
    study_features,
)
from training.tune.spaces import finetune_params, frozen_params
from training.tune.status import best_trial, state_counts
from training.tune.storage import check_parallel, make_storage, storage_url, study_lock
from training.tune.study import OBJECTIVE, StudyConfig, TuneError, make_pruner, make_sampler

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def create_or_resume(
    name: str, conf: StudyConfig, *, url: str | None = None, prepare: bool = True
) -> optuna.Study:
    """Create the study (or load it, checking it is the same search); record its config.

    A resumed study keeps its data, architecture, mode and epochs; it may ask for more
    trials, another parallelism or another pruner. ``prepare`` computes the cached backbone
    features once, here, so that trials only load them.
    """
    import optuna

    conf.validate()
    url = storage_url(url)
    check_parallel(url, conf.parallel)
    conf.data = str(Path(conf.data).resolve())
    storage = make_storage(url)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True
    )
    if study.metric_names is None:  # shown by optuna-dashboard and `sortline tune list`
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    old = study.user_attrs.get("config")
    if old is not None:
        fixed = {k: v for k, v in asdict(conf).items() if k not in StudyConfig.MUTABLE}
        before = {k: old.get(k) for k in fixed}
        diff = {k: (before[k], v) for k, v in fixed.items() if before[k] != v}
        if diff:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise TuneError(
                f"study {name!r} exists with another configuration ({what}); resume it with "
                "the same --data/--arch/--mode/--epochs, or choose another --study name"
            )
    record = asdict(conf)
    if prepare:
        record["features"] = str(prepare_features(conf))
    study.set_user_attr("config", record)
    study.set_user_attr("objective", OBJECTIVE)
    return study


def load_study(name: str, *, url: str | None = None, pruner: bool = True) -> optuna.Study:
    """Load an existing study with its configured pruner and a TPE sampler."""
    import optuna

    storage = make_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler())
    except KeyError:
        raise TuneError(
            f"no study {name!r} in {mask_url(storage_url(url))}; create it with "
            "`sortline tune --study NAME ...`"
        ) from None
    if pruner:
        conf = StudyConfig.from_attrs(study.user_attrs)
        study.pruner = make_pruner(conf.pruner, conf.epochs)
    return study


def run_one_trial(
    name: str,
    *,
    worker: str | None = None,
    task_id: str | None = None,
    expect: dict | None = None,
    url: str | None = None,
) -> dict:
    """Run at most one trial of study *name*; return what happened.

    ``status`` is ``ran`` (with the trial's number, state and value), ``done`` (the study has
    its trials: nothing to do, e.g. a redelivered message) or ``wait`` (no trial may start now:
    ``parallel`` are running, or all slots are taken by running trials that may yet turn out
    dead; ask again in ``retry_in`` seconds).
    """
    import optuna

    url = storage_url(url)
    study = load_study(name, url=url)
    raw = study.user_attrs["config"]
    conf = StudyConfig.from_attrs(study.user_attrs)
    for k, v in (expect or {}).items():
        if k in ("data", "arch", "mode") and v is not None and v != raw.get(k):
            raise TuneError(f"study {name!r} has {k} {raw.get(k)!r}, the message {v!r}")
    objective = objective_frozen if conf.mode == "frozen" else objective_finetune
    if conf.mode == "frozen":
        study_features(raw)  # load before taking the lock
    retry_in = max(1, min(5, get_tune_settings().tune_heartbeat_interval))
    ran: dict[str, Any] = {}

    with study_lock(url, name) as release:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        c = state_counts(study)
        # slots taken: finished, running, queued retries, and trials that failed with an error
        taken = c["finished"] + c["RUNNING"] + c["WAITING"] + c["errors"]
        if c["finished"] >= conf.trials or (taken >= conf.trials and not c["WAITING"]):
            if c["RUNNING"] and c["finished"] < conf.trials:
                return {"status": "wait", "retry_in": retry_in, "counts": c}
            return {"status": "done", "counts": c}
        if conf.parallel and c["RUNNING"] >= conf.parallel:
            return {"status": "wait", "retry_in": retry_in, "counts": c}

        def run(trial: optuna.Trial) -> float:
            release()  # the trial is asked (RUNNING): others may decide now
            ran["number"] = trial.number
            if task_id:
                trial.set_user_attr("task_id", task_id)
            trial.set_user_attr("worker", worker or "")
            try:
                return objective(trial, conf, raw)
            except optuna.TrialPruned:
                raise
            except BaseException as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
                raise

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Heartbeat.*")
            study.optimize(run, n_trials=1, catch=(Exception,), gc_after_trial=False)

    t = next((t for t in study.get_trials(deepcopy=False) if t.number == ran.get("number")), None)
    if t is None:
        return {"status": "done", "counts": state_counts(study)}
    log.info("study %s trial %d %s value %s", name, t.number, t.state.name, t.value)
    return {"status": "ran", "trial": t.number, "state": t.state.name, "value": t.value}


def run_config(conf: StudyConfig, **kw):
    """The :class:`~training.fit.run.RunConfig` of a study's configuration."""
    from training.fit.run import RunConfig

    augment = conf.frozen_augment if conf.mode == "frozen" else conf.augment
    return RunConfig(
        data=conf.data,
        out=kw.pop("out", ""),
        arch=conf.arch,
        mode=conf.mode,
        pretrained=conf.pretrained,
        augment=augment,
        aug_views=conf.aug_views,
        balance=conf.balance,
        seed=conf.seed,
        split_seed=conf.split_seed,
        resize=conf.resize,
        crop=conf.crop,
        **kw,
    )


def run_config_from_study(study_name: str, *, out: str, url: str | None = None, **overrides):
    """A :class:`~training.fit.run.RunConfig` with the best trial's parameters.

    The configuration carries ``study`` (name, trial, value, storage), which the checkpoint's
    metadata records under ``training``.
    """
    study = load_study(study_name, url=url, pruner=False)
    conf = StudyConfig.from_attrs(study.user_attrs)
    best = best_trial(study)
    if best is None:
        raise TuneError(
            f"study {study_name!r} has no COMPLETE trial yet; `sortline tune status {study_name}`"
        )
    origin = {
        "name": study_name,
        "trial": best.number,
        "value": best.value,
        "params": dict(best.params),
        "storage": mask_url(storage_url(url)),
    }
    if conf.mode == "frozen":
        params = {"frozen": frozen_params(conf, best.params)}
    else:
        params = {"finetune": finetune_params(conf, best.params)}
    cfg = run_config(conf, out=out, study=origin, **params, **overrides)
    if conf.mode == "finetune":
        cfg.augment = params["finetune"].augment
    return cfg
