"""Training: the frozen regime (linear head on cached features) and the finetune regime.

The building blocks are small and importable so that an Optuna objective can call them:
:func:`train_frozen` takes cached features and a :class:`FrozenParams` and reports each
epoch's validation figures through ``on_epoch``; :func:`train_finetune` does the same for a
whole network. :mod:`training.fit.run` assembles a full run from them.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from sortline.errors import ConfigError
from training.data.augment import build_augment
from training.data.features import seed_everything
from training.fit import evaluate as ev
from training.model.calibration import nll
from training.model.factory import layer_depths, split_backbone_head
from training.model.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]
# a batch of student inputs -> the teachers' averaged class probabilities (see training.fit.distill)
Teacher = Callable[[torch.Tensor], torch.Tensor]
DEVICES = ("auto", "cpu", "cuda")


def training_device(device: str) -> torch.device:
    """The torch device of ``--device auto|cpu|cuda``: ``auto`` takes the GPU when there is one."""
    if device not in DEVICES:
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if device == "cuda":
        raise ConfigError(
            "--device cuda: PyTorch sees no CUDA GPU here; use --device cpu (or auto), "
            "or install the CUDA wheels of torch on a machine with a GPU"
        )
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """Where a run trained, for its metadata: ``cpu (2 cores)`` or ``cuda (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


# ---------------------------------------------------------------- shared pieces


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency weights, normalised to mean 1 over the samples."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = counts.sum() / (num_classes * np.maximum(counts, 1))
    return w.astype(np.float32)


def _sampler_order(y: np.ndarray, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    w = class_weights(y, num_classes)[y]
    return torch.multinomial(
        torch.as_tensor(w, dtype=torch.double), len(y), replacement=True, generator=gen
    )


def _epoch_order(
    y: np.ndarray, num_classes: int, balance: str, gen: torch.Generator
) -> torch.Tensor:
    if balance == "sampler":
        return _sampler_order(y, num_classes, gen)
    return torch.randperm(len(y), generator=gen)


def _loss_fn(y: np.ndarray, num_classes: int, balance: str, smoothing: float = 0.0) -> nn.Module:
    weight = torch.from_numpy(class_weights(y, num_classes)) if balance == "loss" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)


def check_balance(balance: str) -> None:
    if balance not in ("sampler", "loss", "none"):
        raise ConfigError(f"balance must be sampler, loss or none, not {balance!r}")


def _val_record(
    epoch: int,
    train_loss: float,
    train_acc: float,
    logits: np.ndarray | None,
    y: np.ndarray,
    classes_n: int,
    seconds: float,
) -> dict:
    """One epoch's record; without val images (a refit on all the data), train figures only."""
    rec = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
    if logits is None or not len(y):
        return {**rec, "seconds": round(seconds, 2)}
    pred = logits.argmax(1)
    from sklearn.metrics import f1_score

    return {
        **rec,
        "val_loss": nll(logits, y),
        "val_acc": float((pred == y).mean()),
        "val_macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(classes_n)))),
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------- frozen regime


@dataclass
class FrozenParams:
    """The reference study's head training: Adam, StepLR, 15 epochs."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    step_size: int = 5
    gamma: float = 0.5
    epochs: int = 15
    balance: str = "loss"
    seed: int = 0


@dataclass
class Features:
    """Cached pooled features. ``train`` may hold several augmented views: (V, N, D)."""

    train: np.ndarray
    y_train: np.ndarray
    val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    def view(self, epoch: int) -> np.ndarray:
        return self.train[epoch % len(self.train)] if self.train.ndim == 3 else self.train


def train_frozen(
    feats: Features, params: FrozenParams, on_epoch: EpochCallback | None = None
) -> tuple[nn.Linear, list[dict]]:
    """Train a linear head on cached features; return it and the per-epoch history.

    Each epoch uses the next augmented view of the training features (if there are several).
    ``on_epoch`` receives every epoch's record (val loss, accuracy, macro-F1); it may raise to
    stop early (an Optuna pruner does).
    """
    check_balance(params.balance)
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    dim = feats.val.shape[1]
    head = nn.Linear(dim, feats.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=params.step_size, gamma=params.gamma)
    loss_fn = _loss_fn(feats.y_train, feats.num_classes, params.balance)
    y_tr = torch.from_numpy(feats.y_train).long()
    x_va = torch.from_numpy(feats.val)
    history = []
    for epoch in range(1, params.epochs + 1):
        t0 = time.perf_counter()
        x_tr = torch.from_numpy(feats.view(epoch - 1))
        order = _epoch_order(feats.y_train, feats.num_classes, params.balance, gen)
        head.train()
        tot, correct = 0.0, 0
        for i in range(0, len(order), params.batch_size):
            idx = order[i : i + params.batch_size]
            logits = head(x_tr[idx])
            loss = loss_fn(logits, y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_tr[idx]).sum())
        sched.step()
        head.eval()
        with torch.no_grad():
            val_logits = head(x_va).numpy()
        rec = _val_record(
            epoch,
            tot / len(order),
            correct / len(order),
            val_logits,
            feats.y_val,
            feats.num_classes,
            time.perf_counter() - t0,
        )
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
    return head, history


# ---------------------------------------------------------------- finetune regime


@dataclass
class FinetuneParams:
    """Whole-network fine-tuning: AdamW, discriminative LRs, cosine with warm-up."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # head
    backbone_lr: float = 2e-4
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # 0 = off
    layer_decay: float = 1.0  # layer-wise LR decay: a backbone layer gets backbone_lr * d**depth
    drop_path: float = 0.0  # stochastic depth rate of the network (timm architectures)
    augment: str = "robust"
    balance: str = "sampler"
    freeze_bn: bool = True  # keep BatchNorm statistics from pre-training (better robustness)
    lp_init: bool = True  # LP-FT: start from the linear probe's head
    wise_alpha: float | None = None  # WiSE-FT: blend with the frozen model (1 = fine-tuned only)
    wise_alphas: tuple[float, ...] = ()  # or choose alpha among these on the val split
    tta: bool = False
    distill_weight: float = 0.7  # with teachers: weight of their soft targets (1 - it: labels)
    loader_workers: int | None = None  # DataLoader workers; None: 0 on the CPU, up to 8 on CUDA
    seed: int = 0


class _Augmented(torch.utils.data.Dataset):
    """Training images through the augmentation: (normalised CHW tensor, label) per index."""

    def __init__(self, images: Sequence[np.ndarray], y: np.ndarray, aug) -> None:
        self.images, self.y, self.aug = images, y, aug

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.aug(Image.fromarray(self.images[j]))), int(self.y[j])


def _loader_workers(requested: int | None, device: torch.device) -> int:
    if requested is None:
        requested = min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    if requested and multiprocessing.current_process().daemon:
        log.warning("a daemonic process (a Celery pool process) cannot start DataLoader workers")
        return 0
    return requested


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(1).mean()


class _EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, m in zip(
            self.shadow.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if s.is_floating_point():
                s.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                s.copy_(m)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def wise_blend(
    zero: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], alpha: float | tuple[float, float]
) -> dict:
    """Weight-space ensemble: (1 - alpha) * zero + alpha * ft for floating tensors. A pair
    (first, last) grades alpha from the first floating tensor (the stem) to the last (the
    head), linearly in their order in the state dict."""
    first, last = (alpha, alpha) if isinstance(alpha, int | float) else alpha
    keys = [k for k, v in ft.items() if v.is_floating_point()]
    at = {k: first + (last - first) * i / max(1, len(keys) - 1) for i, k in enumerate(keys)}
    return {k: (1 - at[k]) * zero[k] + at[k] * v if k in at else v for k, v in ft.items()}


def _optimizer(model: nn.Module, params: FinetuneParams, n_train: int):
    """AdamW with a lower backbone learning rate (decayed layer by layer towards the input
    with ``layer_decay`` < 1); linear warm-up, then a cosine per step."""
    backbone, head = split_backbone_head(model)
    groups = [{"params": backbone, "lr": params.backbone_lr}]
    if params.layer_decay < 1:
        depth = layer_depths(model, backbone)
        top = max(depth)
        groups = [
            {"params": [p for p, d in zip(backbone, depth, strict=True) if d == k],
             "lr": params.backbone_lr * params.layer_decay ** (top - k)}
            for k in sorted(set(depth))
        ]  # fmt: skip
    opt = torch.optim.AdamW(
        [*groups, {"params": head, "lr": params.lr}], weight_decay=params.weight_decay
    )
    steps_per_epoch = math.ceil(n_train / params.batch_size)
    total = params.epochs * steps_per_epoch
    warm = int(params.warmup_epochs * steps_per_epoch)

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def _train_epoch(
    model: nn.Module,
    loader,
    opt,
    sched,
    loss_fn: nn.Module,
    *,
    ema: _EMA | None,
    teacher: Teacher | None,
    distill_weight: float,
) -> tuple[float, float]:
    """One pass over *loader* (bf16 autocast on CUDA); return the mean loss and accuracy."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    tot, correct, n = 0.0, 0, 0
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
            loss = loss_fn(logits, y)
            if teacher is not None:
                w = distill_weight
                loss = (1 - w) * loss + w * _soft_cross_entropy(logits, teacher(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema:
            ema.update(model)
        tot += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return tot / n, correct / n


def train_finetune(
    model: nn.Module,
    train_images: Sequence[np.ndarray],
    y_train: np.ndarray,
    val_images: Sequence[np.ndarray],
    y_val: np.ndarray,
    spec: PreprocessSpec,
    params: FinetuneParams,
    *,
    num_classes: int,
    on_epoch: EpochCallback | None = None,
    teacher: Teacher | None = None,
    deadline: float | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune *model* (its head already initialised, e.g. by the probe); return it + history.

    Trains on the device *model* is on (CUDA: bf16 autocast). With *teacher*, the loss mixes
    the labels with the teachers' probabilities on the same augmented batch. With *deadline*
    (a ``time.time()`` value), no epoch is started that would end after it.
    """
    check_balance(params.balance)
    seed_everything(params.seed)
    gen = torch.Generator().manual_seed(params.seed)
    aug = build_augment(params.augment, spec)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    workers = _loader_workers(params.loader_workers, device)
    data = _Augmented(train_images, y_train, aug)
    loader_gen = torch.Generator().manual_seed(params.seed)  # keeps the global RNG's stream
    model = model.to(memory_format=torch.channels_last)
    opt, sched = _optimizer(model, params, len(y_train))
    loss_fn = _loss_fn(y_train, num_classes, params.balance, params.label_smoothing).to(device)
    ema = _EMA(model, params.ema_decay) if params.ema_decay > 0 else None
    history = []
    for epoch in range(1, params.epochs + 1):
        t0 = time.perf_counter()
        if deadline is not None and history and time.time() + history[-1]["seconds"] > deadline:
            log.warning("stopping before the time budget after epoch %d", epoch - 1)
            break
        model.train()
        if params.freeze_bn:
            _set_bn_eval(model)
        order = _epoch_order(y_train, num_classes, params.balance, gen).tolist()
        batches = [
            order[i : i + params.batch_size] for i in range(0, len(order), params.batch_size)
        ]
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=batches, num_workers=workers, generator=loader_gen, pin_memory=cuda
        )
        train_loss, train_acc = _train_epoch(
            model, loader, opt, sched, loss_fn, ema=ema, teacher=teacher,
            distill_weight=params.distill_weight,
        )  # fmt: skip
        scored = ema.shadow if ema else model
        val_logits = (
            ev.predict_logits(scored, val_images, spec, tta=params.tta) if len(y_val) else None
        )
        rec = _val_record(
            epoch, train_loss, train_acc, val_logits, y_val, num_classes, time.perf_counter() - t0
        )
        history.append(rec)
        log.info("epoch %d: %s", epoch, rec)
        if on_epoch:
            on_epoch(rec)
    return (ema.shadow if ema else model), history


SELECTION_CORRUPTIONS = (
    "clean",
    "background_wood",
    "background_dark",
    "zoom_out_0.6",
    "scene",
    "blur_2.5",
    "jpeg_q15",
)


def selection_score(model: nn.Module, val_images, y_val, spec) -> dict:
    """How runs and WiSE-FT weights are chosen: the mean of clean val macro-F1 and the mean
    val macro-F1 under :data:`SELECTION_CORRUPTIONS` (the test split plays no part)."""
    from training.fit.robustness import robustness_report

    rep = robustness_report(model, val_images, y_val, spec, names=SELECTION_CORRUPTIONS)
    clean = rep["per_corruption"]["clean"]
    robust = rep["mean_corrupted"]["macro_f1"]
    return {
        "val_accuracy": clean["accuracy"],
        "val_macro_f1": clean["macro_f1"],
        "val_robust_macro_f1": robust,
        "score": (clean["macro_f1"] + robust) / 2,
    }


def choose_wise_alpha(
    model: nn.Module, zero_state: dict, alphas: Sequence[float], val_images, y_val, spec
) -> tuple[float, dict]:
    """Pick the WiSE-FT mixing weight on the val split.

    The score is the mean of clean val macro-F1 and the mean macro-F1 over a few robustness
    corruptions of the val images; the test split plays no part.
    """
    ft_state = copy.deepcopy(model.state_dict())
    table = {}
    for a in alphas:
        model.load_state_dict(wise_blend(zero_state, ft_state, a))
        table[str(a)] = selection_score(model, val_images, y_val, spec)
        log.info("WiSE-FT alpha %s on val: %s", a, table[str(a)])
    model.load_state_dict(ft_state)
    best = max(alphas, key=lambda a: (table[str(a)]["score"], a))
    return float(best), {
        "split": "val",
        "corruptions": list(SELECTION_CORRUPTIONS),
        "alphas": table,
    }
