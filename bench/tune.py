"""Wall time of the reference study's hyper-parameter search, measured in one run here.

The reference study ran 20 Optuna trials of a frozen EfficientNet-B0 with a new linear head
(15 epochs each) one after another, re-running the backbone over the (augmented) images in
every epoch. This prints:

(a) that way: Optuna trials drawn from the same space, one after another in one process,
    each a new head trained for 15 epochs (backbone forward with online augmentation over the
    training images + head update, then a forward over the val images); the mean epoch time
    times trials x epochs. By default one whole trial is run and the total is printed as
    extrapolated; --ref-epochs 300 runs all 20 trials and the total is measured;
(b) sortline: backbone features computed once (timed and printed separately, included in
    the totals), then the 20 trials x 15 epochs on the cached features as tasks on the
    training queue, with 1 and then 2 training worker processes (PostgreSQL study, Redis),
    and after the first search `train --from-study` with its best trial, whose val macro-F1
    is printed beside the trial's.

Both use efficientnet_lite0 (ResNet18 and EfficientNet-B0 weights cannot be had offline here;
the reference's EfficientNet-B0 costs about the same per image on this CPU). No pruning in
(b), so both do the same 300 epochs of head training.

    python bench/tune.py [--data DIR] [--trials 20] [--epochs 15] [--ref-epochs 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, Worker, drop_pg, machine, scratch_pg  # noqa: E402


def reference_epochs(
    data: Path, arch: str, n_epochs: int, trial_epochs: int, cache: Path
) -> tuple[float, int]:
    """(a) seconds per epoch of the reference way, and the number of training images.

    Runs Optuna trials in this process, one after another as the reference notebook did: each
    draws the frozen search space (lr, weight_decay, batch_size, step_size, gamma), starts a
    new head and runs *trial_epochs* epochs, each a backbone forward over the augmented
    training images plus a head update, then a forward over the val images. Stops after
    *n_epochs* epochs in all.
    """
    import numpy as np
    import optuna
    import torch
    from PIL import Image
    from sklearn.metrics import f1_score
    from torch import nn

    from training.data.augment import build_augment
    from training.data.dataset import load_resized, load_split
    from training.model.factory import ARCHS, create_model, forward_features
    from training.model.preprocess import PreprocessSpec, preprocess
    from training.tune.spaces import suggest_frozen
    from training.tune.study import make_sampler

    ds = load_split(data)
    info = ARCHS[arch]
    spec = PreprocessSpec(mean=info.mean, std=info.std)
    tr, va = ds.split("train"), ds.split("val")
    # decoded and resized once, held in memory (this favours the reference way)
    x_tr = load_resized(ds, tr, cache_dir=cache)
    x_va = load_resized(ds, va, cache_dir=cache)
    y_tr = torch.tensor([ds.label_index(s) for s in tr])
    y_va = np.array([ds.label_index(s) for s in va])
    model = create_model(arch, num_classes=len(ds.classes), pretrained="auto")
    model = model.to(memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    aug = build_augment("combined", spec)
    loss_fn = nn.CrossEntropyLoss()

    def feats(arrays, fn) -> torch.Tensor:
        x = torch.from_numpy(np.stack([fn(Image.fromarray(a)) for a in arrays]))
        with torch.no_grad():
            return forward_features(model, x.contiguous(memory_format=torch.channels_last))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=make_sampler())
    done = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal done
        hp = suggest_frozen(trial)
        head = nn.Linear(info.feature_dim, len(ds.classes))
        opt = torch.optim.Adam(head.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, hp["step_size"], gamma=hp["gamma"])
        bs, f1 = hp["batch_size"], 0.0
        for epoch in range(min(trial_epochs, n_epochs - done)):
            order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(done))
            for i in range(0, len(order), bs):
                idx = order[i : i + bs].tolist()
                loss = loss_fn(head(feats([x_tr[j] for j in idx], aug)), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            with torch.no_grad():
                logits = torch.cat(
                    [
                        head(feats(x_va[i : i + 64], lambda im: preprocess(im, spec)))
                        for i in range(0, len(x_va), 64)
                    ]
                )
            f1 = f1_score(y_va, logits.argmax(1).numpy(), average="macro")
            done += 1
            print(
                f"  reference trial {trial.number} epoch {epoch + 1} ({done}/{n_epochs} in all): "
                f"val macro-F1 {f1:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        return f1

    t0 = time.perf_counter()
    while done < n_epochs:
        study.optimize(objective, n_trials=1)
    print(f"  reference best trial: val macro-F1 {study.best_value:.4f} {study.best_params}")
    return (time.perf_counter() - t0) / n_epochs, len(tr)


def reproduce_best(name: str, out: Path) -> tuple[float, float, float]:
    """`sortline train --from-study`: (best trial's value, the new run's val macro-F1, seconds)."""
    from training.fit.run import train
    from training.tune.runner import run_config_from_study

    cfg = run_config_from_study(name, out=str(out), register=False, robustness=False)
    t0 = time.perf_counter()
    val_f1 = train(cfg)["metrics"]["val"]["macro_f1"]
    return cfg.study["value"], val_f1, time.perf_counter() - t0


def sortline_search(
    data: Path, arch: str, trials: int, epochs: int, workers: int, log: Path, reproduce: bool
):
    """(b) seconds to prepare the study (features) and to run the trials on *workers*."""
    from training.tune.runner import create_or_resume, load_study
    from training.tune.status import state_counts
    from training.tune.study import StudyConfig
    from worker.tasks.training import enqueue_trials

    db = scratch_pg()
    os.environ["SORTLINE_DATABASE_URL"] = db
    env = {k: v for k, v in os.environ.items() if k.startswith("SORTLINE_")}
    procs = []
    try:
        name = f"bench-{workers}w"
        conf = StudyConfig(
            data=str(data), arch=arch, trials=trials, epochs=epochs, parallel=workers,
            pruner="none",
        )  # fmt: skip
        t0 = time.perf_counter()
        create_or_resume(name, conf)
        prepare_s = time.perf_counter() - t0
        procs = [Worker(env, ["-Q", "training", "-c", "1"], log) for _ in range(workers)]
        for w in procs:
            w.wait_ready()
        study = load_study(name, pruner=False)
        t0 = time.perf_counter()
        enqueue_trials(name, data=conf.data, arch=arch, mode="frozen", n=trials)
        while True:
            c = state_counts(study)
            if c["finished"] + c["errors"] >= trials and not c["RUNNING"]:
                break
            time.sleep(0.2)
        search_s = time.perf_counter() - t0
        best = study.best_value
        durations = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.get_trials(deepcopy=False)
            if t.datetime_complete
        ]
        if reproduce:
            value, val_f1, secs = reproduce_best(name, log.parent / f"{name}-from-study")
            print(
                f"    train --from-study {name}: val macro-F1 {val_f1:.4f} vs best trial "
                f"{value:.4f} (difference {abs(val_f1 - value):.4f}, {secs:.1f} s)",
                flush=True,
            )
        return prepare_s, search_s, c, best, sum(durations) / len(durations)
    finally:
        for w in procs:
            w.stop()
        from db.engine import reset_engines

        reset_engines()
        drop_pg(db)


# glibc returns big freed blocks to the kernel and faults them in again on the next batch; on
# this machine's VM that doubled the backbone's time per image. Kept for (a) and (b) alike.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def main() -> None:
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "trashnet")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument(
        "--ref-epochs",
        type=int,
        default=15,
        help="epochs of (a) actually run [15: one whole reference trial; trials x epochs: all]",
    )
    ap.add_argument("--workers", default="1,2", help="training worker counts for (b)")
    args = ap.parse_args()

    os.environ.setdefault("SORTLINE_BROKER_URL", "redis://127.0.0.1:6379/13")
    import redis

    redis.from_url(os.environ["SORTLINE_BROKER_URL"]).flushdb()
    scratch = Path(tempfile.mkdtemp(prefix="sortline-bench-tune-"))
    # a fresh cache: the features are really computed (and timed) in this run
    os.environ["SORTLINE_CACHE_DIR"] = str(scratch / "cache")
    os.environ.pop("SORTLINE_TUNE_STORAGE", None)
    print(f"machine: {machine()}")
    print("malloc: " + ", ".join(f"{k}={v}" for k, v in MALLOC.items()) + " (both ways)")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min)")
    total_epochs = args.trials * args.epochs
    print(f"search: {args.trials} trials x {args.epochs} epochs, {args.arch} frozen, {args.data}")

    print(f"(a) reference way, {args.ref_epochs} epoch(s) measured ...", flush=True)
    # (a) decodes into its own cache, so that (b) decodes the images again in its own timing
    per_epoch, n_train = reference_epochs(
        args.data, args.arch, args.ref_epochs, args.epochs, scratch / "ref"
    )
    a_total = per_epoch * total_epochs
    how = (
        "measured"
        if args.ref_epochs >= total_epochs
        else f"extrapolated from {args.ref_epochs} measured epoch(s)"
    )
    print(
        f"(a) reference: {per_epoch:.1f} s per epoch ({n_train} training images + val), "
        f"x {total_epochs} epochs = {a_total:.0f} s ({a_total / 3600:.2f} h), {how}",
        flush=True,
    )

    features_s = None
    for k in (int(x) for x in args.workers.split(",")):
        print(f"(b) sortline, {k} training worker(s) ...", flush=True)
        prep, search, c, best, mean_trial = sortline_search(
            args.data, args.arch, args.trials, args.epochs, k, scratch / f"worker-{k}.log",
            reproduce=features_s is None,
        )  # fmt: skip
        if features_s is None:
            features_s = prep  # computed in the first run, cached for the next
            print(f"    feature extraction (once, backbone over every image): {prep:.1f} s")
        total = features_s + search
        print(
            f"(b) sortline, {k} worker(s): search {search:.1f} s (mean trial {mean_trial:.2f} s, "
            f"{c['finished']} finished, best val macro-F1 {best:.4f}) + features "
            f"{features_s:.1f} s = {total:.1f} s; {a_total / total:.1f}x faster than (a)",
            flush=True,
        )
    print(f"load average at end: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
