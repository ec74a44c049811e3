"""Refit a chosen recipe on all the development data: the model that is shipped.

A training run fixes its recipe on train/val and is scored once on test. Shipping that run's
weights throws away the val and test photos (30% of TrashNet) for good. :func:`refit` trains
the same recipe again, from the same pretrained weights, on *every* image of the run's split
(train + val + test), and carries over what can only be chosen on held-out photos:

* the WiSE-FT weight the run chose on val;
* the temperature the run fitted on val, and the slope of its shift temperature;
* the share of unfamiliar photos: the run's threshold flags 5% of val, and a share ``q`` of its
  own (in-sample) training photos. The refit's statistics are fitted on all the photos and its
  threshold set so that the same share ``q`` of its (in-sample) training photos is flagged.

Its metadata keeps the run's val and test figures (``metrics``: what the recipe scores on
photos it did not see) and says, under ``refit``, that the file saw every image: no split of
the development data can score it honestly any more.
Run: ``sortline refit CHECKPOINT --out runs/refit``, then ``sortline ship runs/refit ...``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sortline.errors import ConfigError
from training.data.dataset import checkpoint_split, load_resized, write_manifest
from training.data.features import extract, frozen_features, seed_everything
from training.fit.run import SPLITS, RunConfig, last_linear, register
from training.fit.train import (
    EpochCallback,
    Features,
    FinetuneParams,
    FrozenParams,
    device_name,
    train_finetune,
    train_frozen,
    training_device,
    wise_blend,
)
from training.model import unfamiliarity
from training.model.checkpoint import (
    load_checkpoint,
    preprocess_spec,
    read_unfamiliarity,
    save_checkpoint,
)
from training.model.factory import create_model

log = logging.getLogger(__name__)


def recipe(training: dict) -> RunConfig:
    """The :class:`RunConfig` a checkpoint's ``training`` metadata records (unknown keys,
    such as its timing, dropped; settings added since then at their defaults)."""

    def pick(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in (d or {}).items() if k in names}

    kw = pick(RunConfig, training)
    kw["frozen"] = FrozenParams(**pick(FrozenParams, training.get("frozen", {})))
    ft = pick(FinetuneParams, training.get("finetune", {}))
    ft["wise_alphas"] = tuple(ft.get("wise_alphas", ()))
    kw["finetune"] = FinetuneParams(**ft)
    kw["teachers"] = tuple(kw.get("teachers", ()))
    return RunConfig(**kw)


def chosen_alpha(meta: dict) -> float | None:
    """The WiSE-FT weight the run used: fixed in its recipe, or chosen on val (its table)."""
    fixed = (meta.get("training") or {}).get("finetune", {}).get("wise_alpha")
    sel = (meta.get("metrics") or {}).get("wise_selection")
    if not sel:
        return fixed
    if "alpha" in sel:
        return float(sel["alpha"])
    return float(max(sel["alphas"], key=lambda a: sel["alphas"][a]["score"]))


def _flag_rate(model: nn.Module, meta: dict, stats: dict, images: list, spec) -> float:
    """Share of *images* (the run's own training photos) the run's model flags unfamiliar."""
    s = unfamiliarity.score(extract(model, images, spec), stats)
    return float((s > float(meta["unfamiliarity"]["threshold"])).mean())


def refit(
    source: str | Path,
    *,
    out: str | Path,
    data: str | Path | None = None,
    version: str | None = None,
    cache_dir: str = "cache",
    device: str = "auto",
    epochs: int | None = None,
    register_model: bool = True,
    on_epoch: EpochCallback | None = None,
) -> dict:
    """Train *source*'s recipe on every image of its split; write ``out``; return a summary.

    *epochs* overrides the recipe's fine-tuning epochs (only for smoke tests: a shipped refit
    keeps the recipe).
    """
    t_start = time.time()
    src_model, meta = load_checkpoint(source)
    if meta.get("refit"):
        raise ConfigError(
            f"{source} is already a refit on all its data; refit the run it came from"
        )
    if not meta.get("training") or not meta.get("temperature"):
        raise ConfigError(f"{source} records no training recipe or temperature to refit")
    cfg = recipe(meta["training"])
    cfg.out, cfg.cache_dir, cfg.device = str(out), cache_dir, device
    if data is not None:
        cfg.data = str(data)
    if epochs is not None:
        cfg.finetune.epochs = epochs
    cfg.validate()
    if cfg.teachers:
        raise ConfigError("refitting a distilled run is not supported (its teachers saw val)")
    alpha = chosen_alpha(meta)
    ds = checkpoint_split(meta, cfg.data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sha = write_manifest(ds, out)
    spec = preprocess_spec(meta)
    classes = meta["classes"]
    per_split = {sp: ds.split(sp) for sp in SPLITS}
    imgs = {
        sp: load_resized(ds, per_split[sp], short_side=spec.resize, cache_dir=Path(cache_dir))
        for sp in SPLITS
    }
    arrays = {sp: [np.asarray(im) for im in imgs[sp]] for sp in SPLITS}
    y = {sp: np.array([classes.index(s.label) for s in per_split[sp]], np.int64) for sp in SPLITS}
    all_x = [a for sp in SPLITS for a in arrays[sp]]
    all_y = np.concatenate([y[sp] for sp in SPLITS])
    log.info("refit of %s:%s on %d images", meta["name"], meta["version"], len(all_y))

    src_stats = read_unfamiliarity(source)
    q = _flag_rate(src_model, meta, src_stats, arrays["train"], spec) if src_stats else None
    del src_model

    seed_everything(cfg.seed)
    dev = training_device(cfg.device)
    drop_path = cfg.finetune.drop_path if cfg.mode == "finetune" else 0.0
    model = create_model(cfg.arch, num_classes=len(classes), pretrained=cfg.pretrained,
                         drop_path=drop_path)  # fmt: skip
    model = model.to(dev, memory_format=torch.channels_last).eval()
    # linear probe on the frozen backbone's features (shared cache with the run: same manifest)
    feats = frozen_features(
        model, arrays, spec, arch=cfg.arch, pretrained=cfg.pretrained, manifest_sha256=sha,
        augment=cfg.augment_preset, views=0, seed=cfg.seed, cache_dir=cache_dir,
    )  # fmt: skip
    if cfg.mode == "frozen" and cfg.aug_views and cfg.augment_preset != "none":
        log.warning("frozen recipe: the refit's probe uses clean features only")
    x_all = np.concatenate([feats[sp] for sp in SPLITS])
    none_x, none_y = np.zeros((0, x_all.shape[1]), np.float32), np.zeros(0, np.int64)
    fp = FrozenParams(**{**asdict(cfg.frozen), "balance": cfg.balance, "seed": cfg.seed})
    head, probe_history = train_frozen(
        Features(x_all, all_y, none_x, none_y, len(classes)), fp,
        on_epoch if cfg.mode == "frozen" else None,
    )  # fmt: skip
    with torch.no_grad():
        lin = last_linear(model)
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    history: list[dict] = []
    if cfg.mode == "finetune":
        import copy

        zero_state = copy.deepcopy(model.state_dict())
        ftp = FinetuneParams(**{**asdict(cfg.finetune), "seed": cfg.seed,
                                "balance": cfg.balance, "augment": cfg.augment_preset})  # fmt: skip
        model, history = train_finetune(
            model, all_x, all_y, [], none_y, spec, ftp, num_classes=len(classes),
            on_epoch=on_epoch,
        )  # fmt: skip
        if alpha is not None and alpha < 1:
            model.load_state_dict(wise_blend(zero_state, model.state_dict(), alpha))
    model.eval()

    stats, unf_info = _fit_unfamiliarity(model, all_x, all_y, spec, q, meta)
    seconds = time.time() - t_start
    refit_info = {
        "of": f"{meta['name']}:{meta['version']}",
        "images": int(len(all_y)),
        "splits": {sp: len(y[sp]) for sp in SPLITS},
        "wise_alpha": alpha,
        "temperature": "carried over from the run (fitted on its val split)",
        "note": "trained on every image of the development data: the metrics are the run's "
        "(the recipe's, on photos that run did not see); no split here can score this file",
    }
    new_meta = {
        **{k: meta[k] for k in ("arch", "classes", "preprocess", "temperature", "metrics")},
        "name": meta["name"],
        "version": version or time.strftime("%Y%m%d-%H%M%S", time.gmtime()),
        "manifest_sha256": sha,
        "refit": refit_info,
        "training": {**asdict(cfg), "seconds": round(seconds, 1), "ran_on": device_name(dev)},
    }
    if unf_info is not None:
        new_meta["unfamiliarity"] = unf_info
    ckpt = out / "model.safetensors"
    digest = save_checkpoint(ckpt, model, new_meta, unfamiliarity=stats)
    from training.fit import evaluate as ev

    ev.save_json({"history": history, "probe_history": probe_history}, out / "histories.json")
    summary = {"checkpoint": str(ckpt), "sha256": digest, "version": new_meta["version"],
               "seconds": round(seconds, 1), "ran_on": device_name(dev), "refit": refit_info,
               "unfamiliarity": unf_info}  # fmt: skip
    ev.save_json(summary, out / "summary.json")
    if register_model:
        summary["registered"] = register(ckpt)
    return summary


def _fit_unfamiliarity(
    model: nn.Module, images: list, y: np.ndarray, spec, q: float | None, meta: dict
) -> tuple[dict[str, np.ndarray] | None, dict | None]:
    """Gaussians and shift detector on all the photos; the threshold flags the run's
    in-sample share *q* of them; the shift temperature's slope carried over from the run."""
    src = meta.get("unfamiliarity")
    if q is None or not src:
        return None, None
    from training.fit.robustness import SHIFT_FIT, corrupt_mixed

    x = extract(model, images, spec)
    shifted_rgb = [np.asarray(p.convert("RGB")) for p in corrupt_mixed(images, SHIFT_FIT)]
    shifted = extract(model, shifted_rgb, spec)
    stats, threshold = unfamiliarity.fit(x, y, x, shifted_x=shifted, flagged=max(q, 1e-3))
    info = {
        "method": unfamiliarity.method(stats),
        "threshold": threshold,
        "train_flagged": q,
        "fitted_on": "all the photos (in-sample); threshold flags the run's in-sample share",
        "n_train": int(len(x)),
        "shift_slope": src.get("shift_slope"),
        "shift_fit": list(SHIFT_FIT),
    }
    log.info("unfamiliarity: %s, in-sample share flagged %.4f", info["method"], q)
    return stats, info
