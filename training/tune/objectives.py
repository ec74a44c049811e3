"""Trial objectives and the data they share, prepared once per study and per process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from training.tune.spaces import finetune_params, frozen_params, suggest_finetune, suggest_frozen
from training.tune.study import OBJECTIVE, StudyConfig, TuneError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


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


def prepare_features(conf: StudyConfig, cache_dir: str | Path | None = None) -> Path:
    """Compute (or find) the study's backbone features; return the bundle a trial loads.

    The features come from the same cache as ``sortline train`` (same keys), so the final
    training run of ``train --from-study`` does not compute them again.
    """
    import numpy as np
    import torch

    from training.config import get_training_settings
    from training.data.dataset import load_split, manifest_sha256
    from training.data.features import frozen_features
    from training.model.factory import create_model, resolve_preprocess

    cache_dir = Path(cache_dir or get_training_settings().cache_dir)
    t0 = time.perf_counter()
    ds = load_split(conf.data, seed=conf.split_seed)
    sha = manifest_sha256(ds)
    spec = resolve_preprocess(conf.arch, conf.resize, conf.crop)
    views = conf.aug_views if (conf.mode == "frozen" and conf.frozen_augment != "none") else 0
    key = {
        "arch": conf.arch,
        "pretrained": conf.pretrained,
        "manifest_sha256": sha,
        "spec": spec.to_dict(),
        "augment": conf.frozen_augment,
        "views": views,
        "seed": conf.seed,
    }
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
    feats = frozen_features(
        model,
        images,
        spec,
        arch=conf.arch,
        pretrained=conf.pretrained,
        manifest_sha256=sha,
        augment=conf.frozen_augment,
        views=views,
        seed=conf.seed,
        cache_dir=cache_dir,
    )
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
    from training.model.factory import resolve_preprocess

    conf = StudyConfig.from_attrs({"config": json.loads(conf_json)})
    cache_dir = Path(get_training_settings().cache_dir)
    ds = load_split(conf.data, seed=conf.split_seed)
    spec = resolve_preprocess(conf.arch, conf.resize, conf.crop)
    out = {"spec": spec, "classes": ds.classes}
    for sp in ("train", "val"):
        samples = ds.split(sp)
        out[sp] = load_resized(ds, samples, short_side=conf.resize, cache_dir=cache_dir)
        out["y_" + sp] = np.array([ds.label_index(s) for s in samples], dtype=np.int64)
    return out


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
        model,
        d["train"],
        d["y_train"],
        d["val"],
        d["y_val"],
        d["spec"],
        params,
        num_classes=len(d["classes"]),
        on_epoch=_pruning_reporter(trial),
    )
    trial.set_user_attr("val_acc", history[-1]["val_acc"])
    return history[-1][OBJECTIVE]
