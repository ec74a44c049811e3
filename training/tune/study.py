"""A study's configuration: what every trial shares, its pruner and sampler, the errors.

Optuna studies run on the training queue: one study in SQL, one trial per Celery task (see
:mod:`training.tune.runner`). The search spaces are in :mod:`training.tune.spaces`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from sortline.errors import SortlineError

if TYPE_CHECKING:  # optuna is imported where it is used
    import optuna

OBJECTIVE = "val_macro_f1"
PRUNERS = ("median", "percentile", "hyperband", "none")
MODES = ("frozen", "finetune")
FINETUNE_MIN_EPOCHS = 3


class TuneError(SortlineError, ValueError):
    """A study that cannot be created, resumed or used; the message says why."""


def quiet_optuna() -> None:
    """Optuna's log lines go through ``logging`` (shown with ``-v``), its warnings nowhere."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module=r"optuna(\.|$)")


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
        if self.mode == "finetune" and self.epochs < FINETUNE_MIN_EPOCHS:
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
