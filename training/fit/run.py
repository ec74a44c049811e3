"""A full training run as named stages: load the data, fit the probe, fine-tune, evaluate,
write the run folder, register.

:func:`train` chains them; each stage is a function of its own so that a reader (or a test)
can follow one step at a time. The test split is scored once, in :func:`evaluate_run`.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sortline.errors import ConfigError
from training.data.dataset import Dataset, load_resized, load_split, write_manifest
from training.data.features import frozen_features, seed_everything
from training.fit import evaluate as ev
from training.fit.train import (
    EpochCallback,
    Features,
    FinetuneParams,
    FrozenParams,
    check_balance,
    choose_wise_alpha,
    device_name,
    train_finetune,
    train_frozen,
    training_device,
    wise_blend,
)
from training.model.factory import ARCHS, create_model, head_module, resolve_preprocess
from training.model.preprocess import PreprocessSpec
from training.reports.charts import confusion_png, curves_png

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class RunConfig:
    """Everything a training run needs; stored in the checkpoint as its training settings."""

    data: str
    out: str
    arch: str = "efficientnet_lite0"
    mode: str = "frozen"
    pretrained: str = "auto"
    augment: str | None = None  # default: combined (frozen), robust (finetune)
    aug_views: int = 3  # frozen mode: augmented feature views cached per training image
    balance: str = "loss"
    seed: int = 0
    split_seed: int = 0
    resize: int | None = None  # default: the architecture's own input size
    crop: int | None = None
    frozen: FrozenParams = field(default_factory=FrozenParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    robustness: bool = True
    name: str = "sortline-trashnet"
    version: str | None = None
    half: bool = False
    register: bool = True
    cache_dir: str = "cache"
    study: dict | None = None  # train --from-study: the study and trial it comes from
    device: str = "auto"  # auto | cpu | cuda (auto: the GPU when there is one)
    teachers: tuple[str, ...] = ()  # finetune: distil from these runs (training.fit.distill)

    def __post_init__(self) -> None:
        from training.model.factory import input_size

        self.resize, self.crop = input_size(self.arch, self.resize, self.crop)

    @property
    def augment_preset(self) -> str:
        return self.augment or ("combined" if self.mode == "frozen" else "robust")

    def validate(self) -> None:
        if self.mode not in ("frozen", "finetune"):
            raise ConfigError(f"mode must be frozen or finetune, not {self.mode!r}")
        check_balance(self.balance)
        if self.resize and self.crop and self.crop > self.resize:
            raise ConfigError(f"--crop {self.crop} is larger than --resize {self.resize}")
        if self.teachers and self.mode != "finetune":
            raise ConfigError("distilling from teachers needs --mode finetune")
        if self.arch not in ARCHS:
            raise ConfigError(
                f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}"
            )


@dataclass
class RunData:
    """The split, its labels, its resized images and the preprocessing of a run."""

    dataset: Dataset
    spec: PreprocessSpec
    manifest_sha256: str
    images: dict[str, list]
    y: dict[str, np.ndarray]

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes


def load_data(cfg: RunConfig, out: Path) -> RunData:
    """Split the dataset (manifest written into *out*) and load every split's images resized."""
    ds = load_split(cfg.data, seed=cfg.split_seed)
    sha = write_manifest(ds, out)
    for f, why in ds.skipped:
        log.warning("skipped corrupt image %s: %s", f, why)
    spec = resolve_preprocess(cfg.arch, cfg.resize, cfg.crop)
    split = {sp: ds.split(sp) for sp in SPLITS}
    y = {sp: np.array([ds.label_index(s) for s in split[sp]], dtype=np.int64) for sp in split}
    images = {
        sp: load_resized(ds, split[sp], short_side=cfg.resize, cache_dir=Path(cfg.cache_dir))
        for sp in split
    }
    log.info("data: %s", {sp: len(v) for sp, v in split.items()})
    return RunData(ds, spec, sha, images, y)


def last_linear(model: nn.Module) -> nn.Linear:
    """The last linear layer of *model*'s head: the one a probe or an adaptation refits."""
    return [m for m in head_module(model).modules() if isinstance(m, nn.Linear)][-1]


def fit_probe(
    cfg: RunConfig, model: nn.Module, data: RunData, on_epoch: EpochCallback | None
) -> list[dict]:
    """Train a linear head on cached backbone features and put it into *model*'s head."""
    augment = cfg.augment_preset
    views = cfg.aug_views if (cfg.mode == "frozen" and augment != "none") else 0
    feats = frozen_features(
        model, data.images, data.spec, arch=cfg.arch, pretrained=cfg.pretrained,
        manifest_sha256=data.manifest_sha256, augment=augment, views=views, seed=cfg.seed,
        cache_dir=cfg.cache_dir,
    )  # fmt: skip
    train_x = feats["train_aug"] if views else feats["train"]
    params = FrozenParams(**{**asdict(cfg.frozen), "balance": cfg.balance, "seed": cfg.seed})
    nc = len(data.classes)
    head, history = train_frozen(
        Features(train_x, data.y["train"], feats["val"], data.y["val"], nc), params, on_epoch
    )
    with torch.no_grad():
        lin = last_linear(model)
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    return history


def fine_tune(
    cfg: RunConfig,
    model: nn.Module,
    data: RunData,
    on_epoch: EpochCallback | None,
    deadline: float | None = None,
) -> tuple[nn.Module, list[dict], dict]:
    """Fine-tune the whole network from the probe (distilled from ``cfg.teachers`` if any);
    WiSE-FT blend chosen on val."""
    fp = FinetuneParams(
        **{**asdict(cfg.finetune), "seed": cfg.seed, "balance": cfg.balance,
           "augment": cfg.augment_preset}
    )  # fmt: skip
    zero_state = copy.deepcopy(model.state_dict())
    if not fp.lp_init:
        lin = last_linear(model)
        nn.init.normal_(lin.weight, std=0.01)
        nn.init.zeros_(lin.bias)
    teacher = None
    if cfg.teachers:
        from training.fit.distill import load_teachers

        teacher = load_teachers(
            cfg.teachers, classes=data.classes, manifest_sha256=data.manifest_sha256,
            student=data.spec, device=next(model.parameters()).device,
        )  # fmt: skip
    model, history = train_finetune(
        model, data.images["train"], data.y["train"], data.images["val"], data.y["val"],
        data.spec, fp, num_classes=len(data.classes), on_epoch=on_epoch, teacher=teacher,
        deadline=deadline,
    )  # fmt: skip
    extra: dict = {}
    alpha = fp.wise_alpha
    if fp.wise_alphas:
        alpha, extra["wise_selection"] = choose_wise_alpha(
            model, zero_state, fp.wise_alphas, data.images["val"], data.y["val"], data.spec
        )
        extra["wise_selection"]["alpha"] = alpha
    if alpha is not None and alpha < 1:
        model.load_state_dict(wise_blend(zero_state, model.state_dict(), alpha))
    extra["wise_alpha"] = alpha
    return model, history, extra


def evaluate_run(cfg: RunConfig, model: nn.Module, data: RunData) -> dict:
    """Calibrate on val, score val and (once) test, and the robustness check on test."""
    return ev.score_splits(
        model, data.images, data.y, data.spec, data.classes,
        tta=cfg.mode == "finetune" and cfg.finetune.tta, robustness=cfg.robustness,
    )  # fmt: skip


def fit_unfamiliarity(
    model: nn.Module,
    images: dict[str, list],
    y: dict[str, np.ndarray],
    spec: PreprocessSpec,
    temperature: float,
) -> tuple[dict[str, np.ndarray], dict]:
    """Unfamiliarity statistics and the shift temperature of *model* (see the module
    :mod:`training.model.unfamiliarity`): Gaussians on the train split's features, a shift
    detector of train photos against the same photos under one ``SHIFT_FIT`` corruption each,
    the threshold flagging 5% of val, and the slope of the temperature fitted (NLL) on val
    and val under every ``SHIFT_FIT`` corruption."""
    from training.data.features import extract
    from training.fit.robustness import SHIFT_FIT, corrupt, corrupt_mixed
    from training.model import unfamiliarity
    from training.model.calibration import fit_shift_slope
    from training.model.factory import head_module

    def rgb(pil: list) -> list[np.ndarray]:
        return [np.asarray(p.convert("RGB")) for p in pil]

    arrays = {sp: [np.asarray(im) for im in images[sp]] for sp in ("train", "val")}
    x = {sp: extract(model, arrays[sp], spec) for sp in ("train", "val")}
    shifted = extract(model, rgb(corrupt_mixed(arrays["train"], SHIFT_FIT)), spec)
    stats, threshold = unfamiliarity.fit(x["train"], y["train"], x["val"], shifted_x=shifted)
    val_shift = np.concatenate(
        [x["val"]] + [extract(model, rgb(corrupt(arrays["val"], n)), spec) for n in SHIFT_FIT]
    )
    head = copy.deepcopy(head_module(model)).float().cpu()
    with torch.no_grad():
        logits = head(torch.from_numpy(val_shift)).numpy()
    slope = fit_shift_slope(
        logits, np.tile(y["val"], 1 + len(SHIFT_FIT)),
        unfamiliarity.score(val_shift, stats), temperature,
    )  # fmt: skip
    info = {
        "method": unfamiliarity.method(stats), "threshold": threshold,
        "val_flagged": unfamiliarity.VAL_FLAGGED, "n_train": len(x["train"]),
        "shift_slope": slope, "shift_fit": list(SHIFT_FIT),
    }  # fmt: skip
    log.info("unfamiliarity: %s, shift slope %.3f", info["method"], slope)
    return stats, info


def short_metrics(m: dict) -> dict:
    """A split's headline figures (no confusion matrix) as stored in the checkpoint."""
    keep = ("n", "accuracy", "macro_f1", "per_class", "ece", "intervals")
    return {k: m[k] for k in keep if k in m}


def write_run_folder(out: Path, data: RunData, full: dict, histories: dict[str, list]) -> None:
    """metrics.json, the classification report, confusion matrix, curves and histories."""
    classes = data.classes
    ev.save_json(full, out / "metrics.json")
    if "test_robustness" in full:
        ev.save_json(full["test_robustness"], out / "robustness.json")
    (out / "classification_report.txt").write_text(
        "test split\n" + ev.report_text(full["test"], classes)
        + "\nval split\n" + ev.report_text(full["val"], classes)
    )  # fmt: skip
    confusion_png(
        full["test"]["confusion"], classes, out / "confusion_matrix.png", title="test split"
    )
    curves_png(histories["history"], out / "curves.png")
    for name, rows in histories.items():
        if rows:
            with open(out / f"{name}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)


def save_run_checkpoint(
    cfg: RunConfig,
    model: nn.Module,
    data: RunData,
    metrics: dict,
    seconds: float,
    out: Path,
    ran_on: str = "cpu",
    unfamiliarity: tuple[dict[str, np.ndarray], dict] | None = None,
) -> dict:
    """Write ``model.safetensors`` with its metadata and ``summary.json``; return the summary."""
    from training.model.checkpoint import save_checkpoint

    version = cfg.version or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    meta = {
        "name": cfg.name,
        "version": version,
        "arch": cfg.arch,
        "classes": data.classes,
        "preprocess": data.spec.to_dict(),
        "temperature": metrics["calibration"]["temperature"],
        "metrics": metrics,
        "manifest_sha256": data.manifest_sha256,
        "training": {**asdict(cfg), "seconds": round(seconds, 1), "ran_on": ran_on},
    }
    stats = None
    if unfamiliarity is not None:
        stats, meta["unfamiliarity"] = unfamiliarity
    ckpt = out / "model.safetensors"
    sha = save_checkpoint(ckpt, model, meta, half=cfg.half, unfamiliarity=stats)
    summary = {
        "checkpoint": str(ckpt),
        "sha256": sha,
        "version": version,
        "seconds": round(seconds, 1),
        "ran_on": ran_on,
        "metrics": metrics,
        "manifest_sha256": data.manifest_sha256,
    }
    ev.save_json(summary, out / "summary.json")
    return summary


def register(checkpoint: str | Path) -> str:
    """Record a checkpoint in the models table as a candidate; return its ``NAME:VERSION``.

    The active model is unchanged: ``sortline models activate`` (or ``--activate``) promotes.
    """
    from db.engine import session_scope
    from db.migrate import ensure_schema
    from db.service import register_model
    from training.model.checkpoint import file_sha256, read_metadata

    meta = read_metadata(checkpoint)
    ensure_schema()
    with session_scope() as s:
        register_model(
            s,
            name=meta["name"],
            version=meta["version"],
            arch=meta["arch"],
            path=str(Path(checkpoint).resolve()),
            sha256=file_sha256(checkpoint),
            classes=meta["classes"],
            metrics=meta.get("metrics", {}),
        )
    return f"{meta['name']}:{meta['version']}"


def train(
    cfg: RunConfig, on_epoch: EpochCallback | None = None, *, deadline: float | None = None
) -> dict:
    """Run one training end to end; write everything into ``cfg.out``; return the summary.

    With *deadline* (a ``time.time()`` value), fine-tuning starts no epoch that would end
    after it (the evaluation after it still runs).
    """
    cfg.validate()
    device = training_device(cfg.device)
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    data = load_data(cfg, out)
    drop_path = cfg.finetune.drop_path if cfg.mode == "finetune" else 0.0
    model = create_model(
        cfg.arch, num_classes=len(data.classes), pretrained=cfg.pretrained, drop_path=drop_path
    )
    model = model.to(device, memory_format=torch.channels_last).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("training on %s", device_name(device))
    probe_history = fit_probe(cfg, model, data, on_epoch if cfg.mode == "frozen" else None)
    histories = {"history": probe_history}
    extra: dict = {}
    if cfg.mode == "finetune":
        model, history, extra = fine_tune(cfg, model, data, on_epoch, deadline)
        histories = {"history": history, "probe_history": probe_history}
    model.eval()
    full = evaluate_run(cfg, model, data)
    if "wise_selection" in extra:
        full["wise_selection"] = extra["wise_selection"]
    write_run_folder(out, data, full, histories)
    metrics = {k: short_metrics(v) if k in ("val", "test", "test_flip_tta") else v
               for k, v in full.items()}  # fmt: skip
    unfamiliar = fit_unfamiliarity(
        model, data.images, data.y, data.spec, full["calibration"]["temperature"]
    )
    summary = save_run_checkpoint(
        cfg, model, data, metrics, time.time() - t_start, out, device_name(device), unfamiliar
    )
    if cfg.register:
        summary["registered"] = register(out / "model.safetensors")
    return summary
