"""The search spaces, written out: stable ``suggest_*`` names, log scales stated.

Example:
    >>> import optuna
    >>> trial = optuna.trial.FixedTrial(
    ...     {"lr": 0.01, "weight_decay": 1e-4, "batch_size": 32, "step_size": 5, "gamma": 0.5}
    ... )
    >>> sorted(suggest_frozen(trial))
    ['batch_size', 'gamma', 'lr', 'step_size', 'weight_decay']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.tune.study import FINETUNE_MIN_EPOCHS, StudyConfig

if TYPE_CHECKING:
    import optuna


def suggest_frozen(trial: optuna.Trial) -> dict[str, Any]:
    """The reference study's space for a linear head (Adam + StepLR)."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
        "step_size": trial.suggest_int("step_size", 2, 10),
        "gamma": trial.suggest_float("gamma", 0.1, 0.9),
    }


def suggest_finetune(trial: optuna.Trial, max_epochs: int) -> dict[str, Any]:
    """lr, backbone lr multiplier, weight decay, label smoothing, epochs, augmentation preset."""
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "backbone_lr_mult": trial.suggest_float("backbone_lr_mult", 0.01, 1.0, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 1e-1, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "epochs": trial.suggest_int("epochs", FINETUNE_MIN_EPOCHS, max_epochs),
        "augment": trial.suggest_categorical("augment", ["finetune", "robust", "robust_mix"]),
    }


def frozen_params(conf: StudyConfig, params: dict):
    from training.fit.train import FrozenParams

    return FrozenParams(
        lr=params["lr"],
        weight_decay=params["weight_decay"],
        batch_size=params["batch_size"],
        step_size=params["step_size"],
        gamma=params["gamma"],
        epochs=conf.epochs,
        balance=conf.balance,
        seed=conf.seed,
    )


def finetune_params(conf: StudyConfig, params: dict):
    from training.fit.train import FinetuneParams

    return FinetuneParams(
        epochs=params["epochs"],
        lr=params["lr"],
        backbone_lr=params["lr"] * params["backbone_lr_mult"],
        weight_decay=params["weight_decay"],
        label_smoothing=params["label_smoothing"],
        augment=params["augment"],
        balance=conf.balance,
        seed=conf.seed,
    )
