"""``sortline adapt``: teach a model a site's own reviewed photos in minutes on a CPU.

Two modes. ``finetune`` (the default) trains the network (all but its first layers) for a few
hundred steps from the base weights, each batch half reviewed photos and half a replay of the
base model's training split, half of which is shown in the site's look (``augment.SiteLook``:
the training photo's object on the site's floor, in its colours, blur and compression,
estimated from the reviewed photos), so the site's look is learnt on every training object and
not only on the reviewed ones (random crops and flips; BatchNorm statistics kept as the
base's), while the replayed photos shown as they are keep their features near the base's (a
feature anchor), so the clean photos are not forgotten. ``head`` keeps the backbone and
refits the classifier head (L-BFGS, from the base head, an L2 pull towards it) on the pooled
features of the reviewed photos mixed with the replay (features cached per checkpoint):
seconds instead of minutes, but on the new-site proxy of ``bench/adapt.py`` it gains a quarter
of what the fine-tune does (model card). In both, the temperature and the unfamiliarity
statistics are refitted on the union, and the result is written as a checkpoint with a bumped
version and the provenance of every photo it saw, then registered as a candidate.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.dataset import (
    Dataset,
    DatasetError,
    checkpoint_split,
    load_resized,
    scan_imagefolder,
)

log = logging.getLogger(__name__)


MODES = ("finetune", "head")


@dataclass
class AdaptParams:
    """How the model is adapted. ``head``: on the new-site proxy of ``bench/adapt.py`` no
    setting of a 16-point grid (reviewed weight 1-30, L2 1e-4 to 1e-1) did clearly better over
    seeded splits than these (about +2.4 points on the unseen halves, see the model card).
    ``finetune``: the settings measured on that proxy (model card, "Adapting to a site")."""

    mode: str = "finetune"
    replay: int | None = None  # training images replayed (None: the whole training split)
    seed: int = 0
    # head
    reviewed_weight: float = 3.0  # a reviewed photo counts as this many replayed ones
    l2: float = 1e-3  # pull of the head's weights towards the base head's
    max_iter: int = 200
    # finetune
    steps: int = 600
    batch: int = 16  # photos per step: reviewed ones and replayed training photos
    reviewed_per_batch: int = 8  # of the batch's photos, how many are reviewed ones
    lr: float = 3e-4  # backbone (AdamW, one-cycle schedule)
    head_lr: float = 1e-3
    # the weights kept: wise * fine-tuned + (1 - wise) * base (WiSE-FT). 1 (none of the base)
    # since the feature anchor holds the clean photos where the blend used to (model card)
    wise: float = 1.0
    # the first steps' training crops (px, at most the model's own input size): a step at 192
    # takes 0.44 of the time of one at Lite2's 260 (bench/adapt_steps.py)
    crop: int | None = 192
    # the last steps train at the model's own input size, as it runs (FixRes-style: the
    # 192-px crops show objects smaller than the model sees them). With ``frozen`` and WiSE-FT
    # 0.5, all 600 at 260 were chosen on three halves of the proxy (model card); the first 200
    # went back to 192 px for time (600 at 260 took 569-591 s of the 10 minutes)
    full_steps: int = 400
    site_look: float = 0.5  # share of replayed photos shown in the site's look (SiteLook)
    # the first layers from the input (``factory.layer_depths``: Lite2's stem conv, its
    # BatchNorm, then one block per layer) keep the base's weights: no backward pass through
    # them, so a step at 260 px takes 0.65 of the time (the backbone's last layer always trains)
    frozen: int = 5
    # weight of a feature anchor: during the full-size steps, the replayed photos shown as they
    # are (not in the site's look) go through the evaluation transform and their pooled
    # features are pulled towards the base's (cached per checkpoint, so no extra forward pass):
    # squared distance over the base features' mean squared norm. 0: off. On three halves of
    # the proxy, 1 kept the clean test (-0.2) at the unblended fine-tune's gain (model card)
    anchor: float = 1.0
    # seconds for the whole adaptation (0 or None: no limit). Machines of one kind differ in
    # speed by up to 3x: the fine-tune runs at most ``steps`` steps, fewer where they would
    # not fit, its schedule (learning rate, the switch to full size) following whichever is
    # further along, the steps done or the share of its time spent (model card)
    budget: float | None = 540.0


def train_crop(params: AdaptParams, spec) -> int:
    """The fine-tune's training crop size: ``params.crop``, at most the model's own input."""
    return min(params.crop or spec.crop, spec.crop)


def full_size_steps(params: AdaptParams) -> int:
    """How many of the fine-tune's last steps train at the model's own input size."""
    return min(params.full_steps, params.steps)


def plan_position(done: int, elapsed: float, steps: int, seconds: float | None) -> int:
    """Where the fine-tune stands in its plan of *steps* steps: the steps *done*, or the share
    of its *seconds* spent (*elapsed*) times *steps*, whichever is further along. The plan
    ends (the result is *steps* or more) when the time is spent."""
    if not seconds or seconds <= 0:
        return done
    return max(done, int(elapsed / seconds * steps))


def bump_version(version: str, taken: set[str]) -> str:
    """The next free version after *version*: ``1.1.0`` -> ``1.1.1``, else ``V-adapt1``."""
    m = re.fullmatch(r"(.*?)(\d+)", version)
    make = (
        (lambda i: f"{m.group(1)}{int(m.group(2)) + i}") if m else (lambda i: f"{version}-adapt{i}")
    )
    i = 1
    while make(i) in taken:
        i += 1
    return make(i)


def fit_head(
    weight: np.ndarray,
    bias: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray,
    params: AdaptParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted cross-entropy on features from the base head, plus an L2 pull towards it."""
    w0 = torch.from_numpy(np.asarray(weight, np.float32))
    x_t = torch.from_numpy(np.asarray(x, np.float32))
    y_t = torch.from_numpy(np.asarray(y, np.int64))
    sw = torch.from_numpy(np.asarray(sample_weight, np.float32))
    sw = sw / sw.sum()
    w = w0.clone().requires_grad_()
    b = torch.from_numpy(np.asarray(bias, np.float32)).clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], max_iter=params.max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(x_t @ w.T + b, y_t, reduction="none")
        loss = (ce * sw).sum() + params.l2 * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def _reviewed(folder: Path, classes: list[str]):
    """The reviewed ImageFolder; every class folder must be one of the model's classes."""
    ds = scan_imagefolder(folder, allow_empty=True)
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise DatasetError(
            f"{folder}: folders {', '.join(unknown)} are not classes of the base model "
            f"({', '.join(classes)}); move their images into one of those"
        )
    return ds


def _registered_versions(name: str) -> set[str]:
    from db.engine import session_scope
    from db.migrate import ensure_schema
    from db.service import list_models

    ensure_schema()
    with session_scope() as s:
        return {r.version for r in list_models(s) if r.name == name}


def _site_features(
    model, meta, reviewed: Path, data, cache_dir
) -> tuple[dict, Dataset, np.ndarray]:
    """The base's split features (cached per checkpoint) and the reviewed photos' features."""
    from training.data.features import extract, split_features
    from training.model.checkpoint import preprocess_spec

    classes, spec = meta["classes"], preprocess_spec(meta)
    rev = _reviewed(reviewed, classes)
    feats = split_features(model, meta["_sha256"], meta["arch"], spec, checkpoint_split(meta, data),
                           cache_dir)  # fmt: skip
    imgs = load_resized(rev, rev.samples, short_side=spec.resize, cache_dir=Path(cache_dir))
    feats["reviewed_x"] = extract(model, imgs, spec)  # not cached: each adaptation pays for its own
    feats["reviewed_y"] = np.array([classes.index(s.label) for s in rev.samples], np.int64)
    return feats, rev, feats["reviewed_y"]


def _replay_rows(n_train: int, params: AdaptParams) -> np.ndarray:
    """Rows of the training split replayed beside the reviewed photos (seeded sample or all)."""
    if params.replay is not None and params.replay < n_train:
        rng = np.random.default_rng(params.seed)
        return np.sort(rng.choice(n_train, params.replay, replace=False))
    return np.arange(n_train)


def _refit(model, feats: dict, params: AdaptParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refit the head on the replay sample and the reviewed photos; return (w, b, replay rows)."""
    from training.fit.run import last_linear

    keep = _replay_rows(len(feats["train_y"]), params)
    rx, ry = feats["reviewed_x"], feats["reviewed_y"]
    feats["fit_x"] = np.concatenate([feats["train_x"][keep], rx])
    feats["fit_y"] = np.concatenate([feats["train_y"][keep], ry])
    sw = np.concatenate([np.ones(len(keep)), np.full(len(ry), params.reviewed_weight)])
    lin = last_linear(model)
    w, b = fit_head(lin.weight.detach().numpy(), lin.bias.detach().numpy(), feats["fit_x"],
                    feats["fit_y"], sw, params)  # fmt: skip
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    return w, b, keep


def finetune(
    model: torch.nn.Module,
    spec,
    reviewed: tuple[list[np.ndarray], np.ndarray],
    replay: tuple[list[np.ndarray], np.ndarray],
    params: AdaptParams,
    progress: Callable[[str], None] | None = None,
    look: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    replay_features: np.ndarray | None = None,
    seconds: float | None = None,
) -> list[float]:
    """Train *model* (all but its first ``params.frozen`` layers, and never the BatchNorm
    statistics) for ``params.steps`` steps on batches that are half
    reviewed photos, half replayed training photos (uint8 HWC images and their labels), with
    random crops (half the area or more, :func:`train_crop` pixels, the model's own size for
    the last ``params.full_steps``) and flips. BatchNorm layers
    stay in eval mode: their statistics are the base's (re-estimating them on a site's few
    photos did much worse). With ``params.anchor``, during the full-size steps the replayed
    photos not shown in the site's look go through the evaluation transform instead and
    their pooled features are pulled towards *replay_features*.
    *progress* gets a line every 25 steps. *look* (a fitted
    :class:`training.data.augment.SiteLook` or any such function) renders a replayed photo
    in the site's look; ``params.site_look`` of them are. *replay_features*: the base's pooled
    features of the replayed photos (evaluation transform), for ``params.anchor``.
    *seconds*: time for the steps; where ``params.steps`` would not fit, the schedule moves on
    by the share of it spent (:func:`plan_position`) and the fine-tune stops when it is spent.
    Returns the loss of every step run."""
    from PIL import Image
    from torchvision import transforms as T

    from training.fit.run import last_linear
    from training.model.factory import forward_features, head_module, layer_depths
    from training.model.preprocess import normalise, preprocess

    def augment(size: int):
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25)),
            T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
        ])  # fmt: skip

    small, full = augment(train_crop(params, spec)), augment(spec.crop)
    first_full = params.steps - full_size_steps(params)
    (rev_imgs, rev_y), (rep_imgs, rep_y) = reviewed, replay
    head = {id(p) for p in last_linear(model).parameters()}
    every = list(model.parameters())
    depth = dict(zip(map(id, every), layer_depths(model, every), strict=True))
    # the backbone's last layer always trains (a small network has fewer than ``frozen``)
    upto = min(params.frozen, max(depth[id(p)] for p in every if id(p) not in head))
    frozen = [p for p in every if depth[id(p)] < upto and id(p) not in head]
    for p in frozen:  # no gradient: the backward pass stops above them
        p.requires_grad_(False)
    trained = [p for p in every if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for p in trained if id(p) not in head], "lr": params.lr},
        {"params": [p for p in trained if id(p) in head], "lr": params.head_lr},
    ], weight_decay=0.0)  # fmt: skip
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[params.lr, params.head_lr],
        total_steps=params.steps,
        # at least two warm-up steps; with 2 steps in all, 0.5 would make the warm-up phase
        # empty (OneCycleLR divides by its length)
        pct_start=0.75 if params.steps == 2 else min(0.5, max(0.1, 2 / params.steps)),
    )
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed)  # the crops and flips
    n_rev = min(len(rev_imgs), params.reviewed_per_batch, params.batch - 1)
    n_rep = min(len(rep_imgs), params.batch - n_rev)
    device = next(model.parameters()).device
    anchored = params.anchor > 0 and replay_features is not None
    if anchored:
        targets = torch.from_numpy(np.asarray(replay_features, np.float32)).to(device)
        scale = float((targets**2).sum(1).mean())
    classifier = head_module(model)
    model.eval()  # BatchNorm statistics frozen; dropout off
    losses: list[float] = []
    drifts: list[float] = []  # the anchored photos' relative feature drift, per step
    t0 = time.time()
    for done in range(params.steps):
        step = plan_position(done, time.time() - t0, params.steps, seconds)
        if step >= params.steps:
            log.info("adapt: the time budget (%.0f s) ends the fine-tune after %d of %d steps",
                     seconds, done, params.steps)  # fmt: skip
            break
        if step != sched.last_epoch:  # behind on time: the schedule skips ahead
            sched.last_epoch = step - 1
            sched.step()
        ri = rng.choice(len(rev_imgs), n_rev, replace=False)
        pi = rng.choice(len(rep_imgs), n_rep, replace=False)
        rep = [rep_imgs[i] for i in pi]
        styled = np.zeros(len(rep), bool)
        if look is not None:
            styled = rng.random(len(rep)) < params.site_look
            rep = [look(a, rng) if st else a for a, st in zip(rep, styled, strict=True)]
        ims = [rev_imgs[i] for i in ri] + rep
        is_full = step >= first_full
        aug = full if is_full else small
        # the anchored photos: replayed, shown as they are, at the model's own size
        anc = np.concatenate([np.zeros(n_rev, bool), ~styled]) & (anchored and is_full)
        x = np.stack([preprocess(Image.fromarray(a), spec) if an
                      else normalise(aug(Image.fromarray(a)), spec)
                      for a, an in zip(ims, anc, strict=True)])  # fmt: skip
        x_t = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        y_t = torch.from_numpy(np.concatenate([rev_y[ri], rep_y[pi]])).to(device)
        feats = forward_features(model, x_t)
        loss = torch.nn.functional.cross_entropy(classifier(feats), y_t)
        if anc.any():
            drift = feats[torch.from_numpy(anc)] - targets[pi[anc[n_rev:]]]
            rel = (drift**2).sum(1).mean() / scale
            drifts.append(rel.item())
            loss = loss + params.anchor * rel
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 < params.steps:
            sched.step()
        losses.append(loss.item())
        if (done + 1) % 25 == 0 or step + 1 == params.steps:
            at = f" (schedule at {step + 1})" if step != done else ""
            line = (f"adapt: step {done + 1}/{params.steps}{at}, loss "
                    f"{np.mean(losses[-25:]):.3f}, {time.time() - t0:.0f} s")  # fmt: skip
            if drifts:
                line += f", feature drift {np.mean(drifts[-25:]):.4f}"
            log.info(line)
            if progress:
                progress(line)
    for p in frozen:
        p.requires_grad_(True)
    return losses


def _steps_seconds(
    model, spec, photos: list[np.ndarray], n_after: int, params: AdaptParams, started: float
) -> tuple[float, float, float] | None:
    """What ``params.budget`` leaves for the fine-tune's steps (None: no budget): the budget
    less the time since *started* and the forward passes over *n_after* photos that follow
    the fine-tune (timed here on *photos*), with a margin for the fits and the file; returned
    with the time spent and the estimate for after the fine-tune."""
    from training.data.features import extract

    if not params.budget or params.budget <= 0:
        return None
    sample, per_photo = photos[:32], float("inf")
    extract(model, sample[:4], spec)  # warm-up
    for _ in range(2):  # the faster of two: one pass is easily slowed by other work
        t = time.time()
        extract(model, sample, spec)
        per_photo = min(per_photo, (time.time() - t) / max(1, len(sample)))
    after = per_photo * n_after * 1.1 + 10.0
    spent = time.time() - started
    left = params.budget - spent - after
    if left < 0.1 * params.budget:
        log.warning("adapt: the budget of %.0f s leaves %.0f s for the fine-tune", params.budget,
                    max(left, 0.0))  # fmt: skip
    return max(left, 1.0), spent, after


def _finetuned_features(model, meta, reviewed: Path, data, cache_dir, params: AdaptParams,
                        progress: Callable[[str], None] | None = None, look=None,
                        started: float | None = None):  # fmt: skip
    """Fine-tune *model* on the reviewed photos and the replay; its features afterwards.
    *started*: when the adaptation began, for ``params.budget``."""
    from training.data.augment import SiteLook
    from training.data.features import extract
    from training.fit.train import wise_blend
    from training.model.checkpoint import preprocess_spec

    classes, spec = meta["classes"], preprocess_spec(meta)
    rev = _reviewed(reviewed, classes)
    ds = checkpoint_split(meta, data)
    cache = Path(cache_dir)
    rev_imgs = load_resized(rev, rev.samples, short_side=spec.resize, cache_dir=cache)
    rev_y = np.array([classes.index(s.label) for s in rev.samples], np.int64)
    imgs = {sp: load_resized(ds, ds.split(sp), short_side=spec.resize, cache_dir=cache)
            for sp in ("train", "val", "test")}  # fmt: skip
    ys = {sp: np.array([ds.label_index(s) for s in ds.split(sp)], np.int64) for sp in imgs}
    keep = _replay_rows(len(ys["train"]), params)
    replay = ([imgs["train"][i] for i in keep], ys["train"][keep])
    described = None  # what SiteLook estimated, for the progress line and the metadata
    if look is None and params.site_look > 0:
        fitted = SiteLook.fit(rev_imgs, replay[0], seed=params.seed)
        look, described = fitted.apply, fitted.describe()
        if progress:
            d = described
            progress(f"adapt: the site's look: light gain {d['gain']}, object zoom {d['zoom']}, "
                     f"blur {d['blur']}, {d['floors']} floor patches")  # fmt: skip
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    anchors = None
    if params.anchor > 0:  # the base's features of the training split (cached per checkpoint)
        from training.data.features import split_features

        base_x = split_features(model, meta["_sha256"], meta["arch"], spec, ds, cache_dir)
        anchors = base_x["train_x"][keep]
    n_after = len(replay[0]) + len(imgs["val"]) + len(imgs["test"]) + len(rev_imgs)
    plan = _steps_seconds(model, spec, rev_imgs, n_after, params, started or time.time())
    seconds = plan[0] if plan else None
    if progress and plan:
        progress(f"adapt: {plan[0]:.0f} s of the {params.budget:.0f} s budget for at most "
                 f"{params.steps} steps ({plan[1]:.0f} s spent, {plan[2]:.0f} s estimated for "
                 "after them)")  # fmt: skip
    losses = finetune(model, spec, (rev_imgs, rev_y), replay, params, progress, look, anchors,
                      seconds)  # fmt: skip
    # WiSE-FT (none by default: the feature anchor keeps the clean photos; model card)
    model.load_state_dict(wise_blend(base_state, model.state_dict(), params.wise))
    if progress:
        progress(f"adapt: features of {n_after} photos for calibration, unfamiliarity and "
                 "figures")  # fmt: skip
    feats: dict[str, Any] = {
        f"{sp}_x": extract(model, imgs[sp] if sp != "train" else replay[0], spec) for sp in imgs
    }
    feats.update({"val_y": ys["val"], "test_y": ys["test"], "reviewed_y": rev_y})
    feats["reviewed_x"] = extract(model, rev_imgs, spec)
    feats["fit_x"] = np.concatenate([feats["train_x"], feats["reviewed_x"]])
    feats["fit_y"] = np.concatenate([replay[1], rev_y])
    if described is not None:
        feats["look"] = described
    feats["steps_run"] = len(losses)
    return feats, rev, keep


def _score(feats: dict, w: np.ndarray, b: np.ndarray, classes: list[str], base_stats):
    """Calibration and the unfamiliarity statistics on val + reviewed; val and test figures.

    *base_stats*: the base's unfamiliarity statistics when the backbone is the base's (``head``
    mode), so that its shift detector (if any) is kept; None after a fine-tune. The Gaussians
    and the threshold are always refitted."""
    from training.fit.run import short_metrics
    from training.model import unfamiliarity
    from training.model.calibration import calibration, expected_calibration_error, softmax
    from training.reports.metrics import classification_metrics

    def logits(f: np.ndarray) -> np.ndarray:
        return f @ w.T + b

    rx, ry = feats["reviewed_x"], feats["reviewed_y"]
    cal_x = np.concatenate([feats["val_x"], rx])
    cal_y = np.concatenate([feats["val_y"], ry])
    cal = calibration(logits(cal_x), cal_y)
    cal["split"] = "val+reviewed"
    detector = base_stats if base_stats and "det_w" in base_stats else None
    stats, threshold = unfamiliarity.fit(feats["fit_x"], feats["fit_y"], cal_x, detector=detector)
    metrics: dict = {"calibration": cal}
    for sp in ("val", "test"):
        m = classification_metrics(feats[f"{sp}_y"], logits(feats[f"{sp}_x"]).argmax(1), classes)
        metrics[sp] = short_metrics(m)
    p_val = softmax(logits(feats["val_x"]), cal["temperature"])
    metrics["val"]["ece"] = expected_calibration_error(p_val, feats["val_y"])
    metrics["reviewed_fit_accuracy"] = float((logits(rx).argmax(1) == ry).mean())
    return metrics, stats, threshold


def _adapted_meta(meta, version, metrics, stats, threshold, n_fit, rev, reviewed, keep, params,
                  seconds):  # fmt: skip
    from training.model import unfamiliarity
    from training.model.checkpoint import model_version, preprocess_spec

    return {
        **{k: v for k, v in meta.items() if k not in ("format", "unfamiliarity", "_sha256")},
        "version": version,
        "temperature": metrics["calibration"]["temperature"],
        "metrics": metrics,
        "unfamiliarity": {
            "method": unfamiliarity.method(stats),
            "threshold": threshold,
            "shift_slope": (meta.get("unfamiliarity") or {}).get("shift_slope", 0.0)
            if "det_w" in stats
            else 0.0,
            "val_flagged": unfamiliarity.VAL_FLAGGED,
            "n_train": n_fit,
            "fitted_on": "train replay + reviewed; threshold on val + reviewed",
        },
        "adapted": {
            "base": model_version(meta),
            "base_sha256": meta["_sha256"],
            "reviewed": str(reviewed.resolve()),
            "photos": [{"file": s.file, "label": s.label, "sha256": s.sha256} for s in rev.samples],
            "skipped": [list(s) for s in rev.skipped],
            "replay": len(keep),
            "mode": params.mode,
            **(
                {"reviewed_weight": params.reviewed_weight, "l2": params.l2}
                if params.mode == "head"
                else {
                    "steps": params.steps,
                    "batch": params.batch,
                    "reviewed_per_batch": params.reviewed_per_batch,
                    "lr": params.lr,
                    "head_lr": params.head_lr,
                    "wise": params.wise,
                    "site_look": params.site_look,
                    "crop": train_crop(params, preprocess_spec(meta)),
                    "full_steps": full_size_steps(params),
                    "frozen": params.frozen,
                    "anchor": params.anchor,
                    "budget": params.budget,
                }
            ),
            "seconds": seconds,
        },
    }


def adapt(reviewed: str | Path, base: str | Path, out: str | Path | None = None, **kw: Any) -> dict:
    """Adapt *base* to the *reviewed* photos (see :func:`_adapt`), with glibc keeping freed
    memory for the next batch meanwhile (``training.fit.memory``: a 260-px step takes 0.9 of
    the time, and the forward passes timed for the budget before the fine-tune take what
    they will take after it)."""
    from training.fit.memory import keep_freed_memory

    with keep_freed_memory():
        return _adapt(reviewed, base, out, **kw)


def _adapt(
    reviewed: str | Path,
    base: str | Path,
    out: str | Path | None = None,
    *,
    data: str | Path | None = None,
    cache_dir: str | Path = "cache",
    params: AdaptParams | None = None,
    register: bool = True,
    progress: Callable[[str], None] | None = None,
    look: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> dict:
    """Adapt *base* to the *reviewed* photos plus a replay of its training split (fine-tune or
    head refit, ``params.mode``); write and register the new checkpoint; return a summary
    (version, checkpoint, figures). *progress* gets the fine-tune's progress lines; *look*
    replaces the site's look fitted on the reviewed photos (``bench/adapt.py --oracle-look``)."""
    from training.fit.evaluate import save_json
    from training.fit.run import last_linear
    from training.model.checkpoint import (
        file_sha256,
        load_checkpoint,
        model_version,
        read_unfamiliarity,
        save_checkpoint,
    )

    params = params or AdaptParams()
    t0 = time.time()
    reviewed = Path(reviewed)
    model, meta = load_checkpoint(base)
    model = model.to(memory_format=torch.channels_last).eval()
    meta["_sha256"] = file_sha256(base)
    if params.mode not in MODES:
        raise ValueError(f"unknown adapt mode {params.mode!r}; choose one of {', '.join(MODES)}")
    if params.mode == "head":
        feats, rev, _ = _site_features(model, meta, reviewed, data, cache_dir)
        w, b, keep = _refit(model, feats, params)
        base_stats = read_unfamiliarity(base)  # same backbone: its shift detector still holds
    else:
        feats, rev, keep = _finetuned_features(
            model, meta, reviewed, data, cache_dir, params, progress, look, started=t0
        )
        lin = last_linear(model)
        w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        base_stats = None  # a new backbone: the base's shift detector no longer applies
    metrics, stats, threshold = _score(feats, w, b, meta["classes"], base_stats)
    taken = _registered_versions(meta["name"]) if register else set()
    version = bump_version(str(meta["version"]), taken)
    out = Path(out or Path("runs") / f"adapt-{version}")
    out.mkdir(parents=True, exist_ok=True)
    seconds = round(time.time() - t0, 1)
    new_meta = _adapted_meta(meta, version, metrics, stats, threshold, len(feats["fit_y"]), rev,
                             reviewed, keep, params, seconds)  # fmt: skip
    if "look" in feats:  # what SiteLook estimated from the reviewed photos
        new_meta["adapted"]["look"] = feats["look"]
    if "steps_run" in feats:  # fewer than ``steps`` where the budget ran out first
        new_meta["adapted"]["steps_run"] = feats["steps_run"]
    ckpt = out / "model.safetensors"
    sha = save_checkpoint(ckpt, model, new_meta, unfamiliarity=stats)
    summary = {
        "checkpoint": str(ckpt), "sha256": sha, "model": model_version(new_meta),
        "base": model_version(meta), "mode": params.mode, "reviewed": len(rev.samples),
        "replay": len(keep),
        "seconds": seconds, "val_accuracy": metrics["val"]["accuracy"],
        "test_accuracy": metrics["test"]["accuracy"],
        **({"steps": feats["steps_run"]} if "steps_run" in feats else {}),
    }  # fmt: skip
    save_json(summary, out / "summary.json")
    if register:
        from training.fit.run import register as register_checkpoint

        summary["registered"] = register_checkpoint(ckpt)
    log.info("adapted %s -> %s in %.1f s", summary["base"], summary["model"], seconds)
    return summary
