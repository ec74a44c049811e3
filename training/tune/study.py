"""Optuna studies on the training queue: one study in SQL, one trial per Celery task.

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

Example:
    >>> from training.tune.study import FROZEN_SPACE
    >>> sorted(FROZEN_SPACE)
    ['batch_size', 'gamma', 'lr', 'step_size', 'weight_decay']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.config import SortlineSettings, get_db_settings, mask_url
from sortline.errors import SortlineError

if TYPE_CHECKING:  # optuna and torch are imported where they are used
    import optuna

log = logging.getLogger(__name__)

OBJECTIVE = "val_macro_f1"
PRUNERS = ("median", "percentile", "hyperband", "none")
MODES = ("frozen", "finetune")

# The reference study's search space (frozen head: Adam + StepLR), then fine-tuning's.
FROZEN_SPACE: dict[str, tuple] = {
    "lr": ("float", 1e-4, 1e-1, True),
    "weight_decay": ("float", 1e-6, 1e-2, True),
    "batch_size": ("categorical", (16, 32, 64, 128)),
    "step_size": ("int", 2, 10),
    "gamma": ("float", 0.1, 0.9, False),
}
FINETUNE_SPACE: dict[str, tuple] = {
    "lr": ("float", 1e-4, 1e-2, True),
    "backbone_lr_mult": ("float", 0.01, 1.0, True),
    "weight_decay": ("float", 1e-4, 1e-1, True),
    "label_smoothing": ("float", 0.0, 0.2, False),
    "epochs": ("int", 3, None),  # upper bound: the study's --epochs
    "augment": ("categorical", ("finetune", "robust", "robust_mix")),
}


class TuneSettings(SortlineSettings):
    """Settings of hyper-parameter studies (``SORTLINE_TUNE_*``)."""

    tune_storage: str = ""  # empty: SORTLINE_DATABASE_URL
    tune_heartbeat_interval: int = 30
    tune_grace_period: int = 90
    tune_max_retry: int = 3
    tune_time_limit: int = 7200


@lru_cache(maxsize=1)
def get_tune_settings() -> TuneSettings:
    """The settings, read once per process."""
    return TuneSettings()


class TuneError(SortlineError, ValueError):
    """A study that cannot be created, resumed or used; the message says why."""


# ---------------------------------------------------------------- storage


OPTUNA_SCHEMA = "optuna"


def storage_url(url: str | None = None) -> str:
    """The study storage: *url*, else ``SORTLINE_TUNE_STORAGE``, else sortline's database.

    Optuna keeps its own Alembic version table, which would clash with sortline's
    ``alembic_version``; so on sortline's own database its tables live apart: in the schema
    ``optuna`` of the same PostgreSQL database, or in ``<name>-optuna.db`` next to a SQLite
    file. A URL given in ``SORTLINE_TUNE_STORAGE`` (or *url*) is used as it is.
    """
    from sqlalchemy.engine import make_url

    explicit = url or get_tune_settings().tune_storage
    u = make_url(explicit or get_db_settings().database_url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if not explicit:
        if u.drivername.startswith("postgresql") and "options" not in u.query:
            u = u.update_query_dict({"options": f"-csearch_path={OPTUNA_SCHEMA}"})
        elif u.drivername.startswith("sqlite") and u.database not in (None, "", ":memory:"):
            db = Path(u.database)
            u = u.set(database=str(db.with_name(f"{db.stem}-optuna{db.suffix or '.db'}")))
    return u.render_as_string(hide_password=False)


@lru_cache(maxsize=8)
def _ensure_schema(url: str) -> None:
    """Create the schema named in a PostgreSQL URL's search_path, if it is missing."""
    import re

    import sqlalchemy
    from sqlalchemy.engine import make_url

    u = make_url(url)
    m = re.search(r"search_path=([A-Za-z_][A-Za-z0-9_]*)", str(u.query.get("options", "")))
    if not u.drivername.startswith("postgresql") or not m:
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{m.group(1)}"'))
    except sqlalchemy.exc.IntegrityError:  # created by a concurrent process
        pass
    finally:
        engine.dispose()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def check_parallel(url: str, parallel: int) -> None:
    """Refuse SQLite for more than one trial at a time, saying why and what to use."""
    if is_sqlite(url) and parallel != 1:
        raise TuneError(
            f"the study storage {mask_url(url)} is SQLite, which cannot run "
            f"{'parallel trials' if parallel == 0 else f'{parallel} trials at once'}: it has one "
            "writer lock for the whole file, so concurrent training workers stall and fail with "
            "'database is locked', and workers on other machines cannot share the file. Use "
            "PostgreSQL (SORTLINE_TUNE_STORAGE or SORTLINE_DATABASE_URL="
            "postgresql://user@host/db), or run one trial at a time with --parallel 1."
        )


_storages: dict[tuple, Any] = {}


def make_storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats and a retry callback for stale (killed) trials.

    One per process and URL (a worker runs many trials; each storage holds a pool).
    """
    import os

    s = get_tune_settings()
    url = storage_url(url)
    key = (os.getpid(), url, s.tune_heartbeat_interval, s.tune_grace_period, s.tune_max_retry)
    if key not in _storages:
        _storages[key] = _new_storage(url, s)
    return _storages[key]


def _new_storage(url: str, s: TuneSettings) -> optuna.storages.RDBStorage:
    import optuna

    kw: dict[str, Any] = {}
    if not is_sqlite(url):
        kw["engine_kwargs"] = {"pool_pre_ping": True}
        _ensure_schema(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

            callback = {"heartbeat_stale_trial_callback": Retry(max_retry=s.tune_max_retry)}
        except ImportError:  # optuna < 4.9
            from optuna.storages import RetryFailedTrialCallback as Retry

            callback = {"failed_trial_callback": Retry(max_retry=s.tune_max_retry)}
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=s.tune_heartbeat_interval,
            grace_period=s.tune_grace_period,
            **callback,
            **kw,
        )


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """The named pruner (median by default), scaled to the trials' number of epochs."""
    import optuna

    warmup = max(1, epochs // 3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=5, n_warmup_steps=warmup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"unknown pruner {name!r}; choose one of {', '.join(PRUNERS)}")


def make_sampler() -> optuna.samplers.BaseSampler:
    """TPE that treats running trials as bad (constant liar), so parallel asks differ."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(constant_liar=True, n_startup_trials=10)


# ---------------------------------------------------------------- the study's configuration


@dataclass
class StudyConfig:
    """What every trial of a study shares; kept in the study's user attributes."""

    data: str
    arch: str = "efficientnet_lite0"
    mode: str = "frozen"
    trials: int = 20  # finished (COMPLETE or PRUNED) trials wanted
    parallel: int = 1  # trials at once at most; 0: as many as there are training workers
    pruner: str = "median"
    epochs: int = 15  # frozen: every trial; finetune: the upper bound of the search
    pretrained: str = "auto"
    augment: str | None = None  # frozen: combined (3 cached views); finetune: searched
    aug_views: int = 3
    balance: str = "loss"
    seed: int = 0
    split_seed: int = 0
    resize: int | None = None  # default: the architecture's own input size
    crop: int | None = None

    # what a resumed study may change
    MUTABLE = ("trials", "parallel", "pruner")

    def __post_init__(self) -> None:
        from training.model.factory import input_size

        self.resize, self.crop = input_size(self.arch, self.resize, self.crop)

    def validate(self) -> None:
        from training.model.factory import ARCHS

        if self.mode not in MODES:
            raise TuneError(f"mode must be frozen or finetune, not {self.mode!r}")
        if self.arch not in ARCHS:
            raise TuneError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.pruner not in PRUNERS:
            raise TuneError(f"unknown pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        if self.trials < 1 or self.parallel < 0 or self.epochs < 1:
            raise TuneError("trials and epochs must be positive, parallel 0 or more")
        if self.mode == "finetune" and self.epochs < FINETUNE_SPACE["epochs"][1]:
            raise TuneError(f"finetune studies search epochs from 3; --epochs {self.epochs} < 3")

    @property
    def frozen_augment(self) -> str:
        return self.augment or "combined"

    @classmethod
    def from_attrs(cls, attrs: dict) -> StudyConfig:
        names = {f.name for f in fields(cls)}
        conf = attrs.get("config")
        if not isinstance(conf, dict):
            raise TuneError("this study was not created by `sortline tune` (no configuration)")
        return cls(**{k: v for k, v in conf.items() if k in names})


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


# ---------------------------------------------------------------- data, prepared once


class _LazyImages(dict):
    """Split name -> resized images, decoded only if a feature cache misses."""

    def __init__(self, ds, split: dict, resize: int, cache_dir: Path) -> None:
        super().__init__()
        self._args = (ds, split, resize, cache_dir)

    def __missing__(self, sp: str):
        from training.data.dataset import load_resized

        ds, split, resize, cache_dir = self._args
        self[sp] = load_resized(ds, split[sp], short_side=resize, cache_dir=cache_dir)
        return self[sp]


def _run_config(conf: StudyConfig, **kw):
    from training.fit.train import RunConfig

    augment = conf.frozen_augment if conf.mode == "frozen" else conf.augment
    return RunConfig(
        data=conf.data, out=kw.pop("out", ""), arch=conf.arch, mode=conf.mode,
        pretrained=conf.pretrained, augment=augment, aug_views=conf.aug_views,
        balance=conf.balance, seed=conf.seed, split_seed=conf.split_seed, resize=conf.resize,
        crop=conf.crop, **kw,
    )  # fmt: skip


def prepare_features(conf: StudyConfig, cache_dir: str | Path | None = None) -> Path:
    """Compute (or find) the study's backbone features; return the bundle a trial loads.

    The features come from the same cache as ``sortline train`` (same keys), so the final
    training run of ``train --from-study`` does not compute them again.
    """
    import numpy as np
    import torch

    from training.config import get_training_settings
    from training.data.dataset import load_split, manifest_sha256
    from training.fit.train import _frozen_features
    from training.model.factory import ARCHS, create_model
    from training.model.preprocess import PreprocessSpec

    cache_dir = Path(cache_dir or get_training_settings().cache_dir)
    t0 = time.perf_counter()
    ds = load_split(conf.data, seed=conf.split_seed)
    sha = manifest_sha256(ds)
    info = ARCHS[conf.arch]
    spec = PreprocessSpec(resize=conf.resize, crop=conf.crop, mean=info.mean, std=info.std)
    views = conf.aug_views if (conf.mode == "frozen" and conf.frozen_augment != "none") else 0
    key = {
        "arch": conf.arch, "pretrained": conf.pretrained, "manifest_sha256": sha,
        "spec": spec.to_dict(), "augment": conf.frozen_augment, "views": views, "seed": conf.seed,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    bundle = cache_dir / "tune" / f"{conf.arch}-{digest}.npz"
    if bundle.exists():
        return bundle
    split = {sp: ds.split(sp) for sp in ("train", "val", "test")}
    y = {sp: np.array([ds.label_index(s) for s in split[sp]], dtype=np.int64) for sp in split}
    if not len(y["train"]) or not len(y["val"]):
        raise TuneError(f"{conf.data}: too few images for a train and a val split")
    images = _LazyImages(ds, split, conf.resize, cache_dir)
    model = create_model(conf.arch, num_classes=len(ds.classes), pretrained=conf.pretrained)
    model = model.to(memory_format=torch.channels_last).eval()
    rc = _run_config(conf, cache_dir=str(cache_dir))
    feats = _frozen_features(rc, model, images, spec, sha, conf.frozen_augment, views)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    tmp = bundle.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        train=feats["train_aug"] if views else feats["train"],
        y_train=y["train"],
        val=feats["val"],
        y_val=y["val"],
        classes=np.array(ds.classes),
        manifest_sha256=np.array(sha),
    )
    tmp.replace(bundle)
    log.info("study features ready in %.1f s: %s", time.perf_counter() - t0, bundle)
    return bundle


@lru_cache(maxsize=2)
def _load_bundle(path: str):
    import numpy as np

    from training.fit.train import Features

    with np.load(path) as z:
        return Features(z["train"], z["y_train"], z["val"], z["y_val"], len(z["classes"]))


def study_features(conf: dict):
    """The trial's features: the bundle the study recorded, rebuilt here if this host lacks it."""
    path = conf.get("features")
    if not path or not Path(path).exists():
        path = str(prepare_features(StudyConfig.from_attrs({"config": conf})))
    return _load_bundle(str(path))


@lru_cache(maxsize=1)
def _finetune_data(conf_json: str):
    """Resized train/val images, labels and preprocessing of a finetune study (per process)."""
    import numpy as np

    from training.config import get_training_settings
    from training.data.dataset import load_resized, load_split
    from training.model.factory import ARCHS
    from training.model.preprocess import PreprocessSpec

    conf = StudyConfig.from_attrs({"config": json.loads(conf_json)})
    cache_dir = Path(get_training_settings().cache_dir)
    ds = load_split(conf.data, seed=conf.split_seed)
    info = ARCHS[conf.arch]
    spec = PreprocessSpec(resize=conf.resize, crop=conf.crop, mean=info.mean, std=info.std)
    out = {"spec": spec, "classes": ds.classes}
    for sp in ("train", "val"):
        samples = ds.split(sp)
        out[sp] = load_resized(ds, samples, short_side=conf.resize, cache_dir=cache_dir)
        out["y_" + sp] = np.array([ds.label_index(s) for s in samples], dtype=np.int64)
    return out


# ---------------------------------------------------------------- objectives


def _suggest(trial: optuna.Trial, space: dict[str, tuple], **bounds) -> dict[str, Any]:
    out = {}
    for name, (kind, *args) in space.items():
        if kind == "float":
            out[name] = trial.suggest_float(name, args[0], args[1], log=args[2])
        elif kind == "int":
            out[name] = trial.suggest_int(name, args[0], bounds.get(name) or args[1])
        else:
            out[name] = trial.suggest_categorical(name, list(args[0]))
    return out


def suggest_frozen(trial: optuna.Trial) -> dict[str, Any]:
    """lr, weight_decay, batch_size, step_size, gamma: the reference study's space."""
    return _suggest(trial, FROZEN_SPACE)


def suggest_finetune(trial: optuna.Trial, max_epochs: int) -> dict[str, Any]:
    """lr, backbone lr multiplier, weight decay, label smoothing, epochs, augmentation preset."""
    return _suggest(trial, FINETUNE_SPACE, epochs=max_epochs)


def frozen_params(conf: StudyConfig, params: dict):
    from training.fit.train import FrozenParams

    return FrozenParams(
        lr=params["lr"], weight_decay=params["weight_decay"], batch_size=params["batch_size"],
        step_size=params["step_size"], gamma=params["gamma"], epochs=conf.epochs,
        balance=conf.balance, seed=conf.seed,
    )  # fmt: skip


def finetune_params(conf: StudyConfig, params: dict):
    from training.fit.train import FinetuneParams

    return FinetuneParams(
        epochs=params["epochs"], lr=params["lr"],
        backbone_lr=params["lr"] * params["backbone_lr_mult"],
        weight_decay=params["weight_decay"], label_smoothing=params["label_smoothing"],
        augment=params["augment"], balance=conf.balance, seed=conf.seed,
    )  # fmt: skip


def _pruning_reporter(trial: optuna.Trial) -> Callable[[dict], None]:
    import optuna

    def on_epoch(rec: dict) -> None:
        trial.report(rec[OBJECTIVE], rec["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {rec['epoch']}")

    return on_epoch


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def objective_frozen(trial: optuna.Trial, conf: StudyConfig, raw_conf: dict) -> float:
    """One frozen trial: a linear head on the cached features; final val macro-F1."""
    from training.fit.train import train_frozen

    params = frozen_params(conf, suggest_frozen(trial))
    # a linear head's matrices are small: more threads only wait for each other (measured on
    # a busy 2-core machine: 25 s per trial with 2 threads, 0.6 s with one)
    with _torch_threads(1):
        _, history = train_frozen(study_features(raw_conf), params, _pruning_reporter(trial))
    trial.set_user_attr("val_acc", history[-1]["val_acc"])
    return history[-1][OBJECTIVE]


def objective_finetune(trial: optuna.Trial, conf: StudyConfig, raw_conf: dict) -> float:
    """One fine-tuning trial (LP-FT: the head starts from a probe on the cached features)."""
    import torch
    from torch import nn

    from training.fit.train import FrozenParams, train_finetune, train_frozen
    from training.model.factory import create_model, head_module

    params = finetune_params(conf, suggest_finetune(trial, conf.epochs))
    d = _finetune_data(json.dumps(raw_conf, sort_keys=True))
    probe, _ = train_frozen(
        study_features(raw_conf), FrozenParams(balance=conf.balance, seed=conf.seed)
    )
    model = create_model(conf.arch, num_classes=len(d["classes"]), pretrained=conf.pretrained)
    with torch.no_grad():
        lin = [m for m in head_module(model).modules() if isinstance(m, nn.Linear)][-1]
        lin.weight.copy_(probe.weight)
        lin.bias.copy_(probe.bias)
    _, history = train_finetune(
        model, d["train"], d["y_train"], d["val"], d["y_val"], d["spec"], params,
        num_classes=len(d["classes"]), on_epoch=_pruning_reporter(trial),
    )  # fmt: skip
    trial.set_user_attr("val_acc", history[-1]["val_acc"])
    return history[-1][OBJECTIVE]


# ---------------------------------------------------------------- one trial per task


def _lock_key(name: str) -> int:
    digest = hashlib.sha256(b"sortline-tune:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(url: str, name: str) -> Iterator[Callable[[], None]]:
    """Hold the study's lock; yield a function that releases it early (idempotent).

    PostgreSQL: a session advisory lock (freed by the server if the worker dies). SQLite: a
    lock file next to the database (one machine only, which is all SQLite supports).
    """
    released = False
    if is_sqlite(url):
        import fcntl

        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if not db or db == ":memory:":
            yield lambda: None
            return
        f = open(f"{db}.tune-lock", "a")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()

    elif url.startswith("postgresql"):
        from sqlalchemy import text

        from db.engine import get_engine

        conn = get_engine(url).connect()
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
        conn.commit()

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
                    conn.commit()
                finally:
                    conn.close()

    else:
        log.warning("no study lock for %s; run one training worker", url.split(":", 1)[0])
        yield lambda: None
        return
    try:
        yield release
    finally:
        release()


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state name, and ``errors`` (FAIL trials whose training raised)."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    c = Counter(t.state.name for t in trials)
    out = {s: c.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    out["errors"] = sum(1 for t in trials if t.state.name == "FAIL" and "error" in t.user_attrs)
    out["finished"] = out["COMPLETE"] + out["PRUNED"]
    return out


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


# ---------------------------------------------------------------- reporting


def _fmt_params(params: dict) -> str:
    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={f(v)}" for k, v in params.items())


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, value, params, duration, worker, retry and error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = None
        if t.datetime_start and t.datetime_complete:
            dur = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "duration_s": None if dur is None else round(dur, 2),
                "worker": t.user_attrs.get("worker", ""),
                "retry_of": t.system_attrs.get("failed_trial"),
                "error": t.user_attrs.get("error"),
                "start": t.datetime_start.isoformat() if t.datetime_start else None,
                "complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None before the first one."""
    try:
        return study.best_trial
    except ValueError:
        return None


def status_text(study: optuna.Study, storage: str | None = None) -> str:
    """The trials table and the best trial, as printed by ``sortline tune status``."""
    rows = trial_rows(study)
    conf = study.user_attrs.get("config", {})
    c = state_counts(study)
    head = (
        f"study {study.study_name}: {conf.get('mode', '?')} {conf.get('arch', '?')} on "
        f"{conf.get('data', '?')}; {c['finished']}/{conf.get('trials', '?')} finished "
        f"({c['COMPLETE']} complete, {c['PRUNED']} pruned), {c['FAIL']} failed, "
        f"{c['RUNNING']} running, {c['WAITING']} waiting"
    )
    if storage:  # the URL optuna-dashboard opens
        head += f"\nstorage {mask_url(storage)}"
    lines = [head, f"{'#':>4}  {'state':<8} {'value':>8} {'seconds':>8}  {'worker':<28} params"]
    for r in rows:
        v = "" if r["value"] is None else f"{r['value']:.4f}"
        d = "" if r["duration_s"] is None else f"{r['duration_s']:.1f}"
        note = f"  (retry of #{r['retry_of']})" if r["retry_of"] is not None else ""
        if r["error"]:
            note += f"  error: {r['error'][:80]}"
        lines.append(
            f"{r['number']:>4}  {r['state']:<8} {v:>8} {d:>8}  {r['worker'][:28]:<28} "
            f"{_fmt_params(r['params'])}{note}"
        )
    b = best_trial(study)
    if b is None:
        lines.append("best: none yet")
    else:
        lines.append(f"best: trial {b.number} value {b.value:.4f} {_fmt_params(b.params)}")
    return "\n".join(lines)


def save_plots(study: optuna.Study, out: str | Path) -> list[Path]:
    """Optimisation history and parameter importances as PNG files in *out*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    for fname, fn in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = fn(study, target_name="validation macro-F1")
            except (ValueError, RuntimeError) as e:  # e.g. importances of a constant objective
                log.warning("no %s: %s", fname, e)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(out / fname)
    return written


# ---------------------------------------------------------------- the final model


def run_config_from_study(study_name: str, *, out: str, url: str | None = None, **overrides):
    """A :class:`~training.fit.train.RunConfig` with the best trial's parameters.

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
    cfg = _run_config(conf, out=out, study=origin, **params, **overrides)
    if conf.mode == "finetune":
        cfg.augment = params["finetune"].augment
    return cfg
