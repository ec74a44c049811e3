"""``sortline train``, ``sortline evaluate`` and ``sortline predict``: thin wrappers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from sortline.cli import fail
from sortline.commands.options import (
    arch_option,
    cache_dir_option,
    checkpoint_option,
    mode_option,
    pretrained_option,
    runtime_options,
)
from training.data.augment import PRESETS


@click.command()
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    help="ImageFolder directory: one sub-folder of images per class (required without --from-study).",
)
@click.option(
    "--from-study",
    "from_study",
    default=None,
    metavar="NAME",
    help="Train with the best trial of this `sortline tune` study (its data, arch, mode, params).",
)
@arch_option
@mode_option
@pretrained_option
@click.option(
    "--epochs", type=click.IntRange(1), default=None, help="Epochs [frozen 15, finetune 10]."
)
@click.option("--lr", type=float, default=None, help="Learning rate of the head [1e-3].")
@click.option(
    "--backbone-lr", type=float, default=None, help="finetune: backbone learning rate [2e-4]."
)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--augment",
    type=click.Choice(PRESETS),
    default=None,
    help="Augmentation preset [frozen: combined, finetune: robust].",
)
@click.option(
    "--balance",
    type=click.Choice(["sampler", "loss", "none"]),
    default="loss",
    show_default=True,
    help="Class imbalance: weighted sampler, class-weighted loss, or nothing.",
)
@click.option(
    "--aug-views",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="frozen: augmented feature views cached per training image (online augmentation).",
)
@click.option(
    "--ema", type=float, default=0.0, show_default=True, help="finetune: EMA decay (0 = off)."
)
@click.option(
    "--layer-decay",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="finetune: layer-wise LR decay; a layer k blocks below the top gets backbone-lr * d**k.",
)
@click.option(
    "--drop-path",
    type=click.FloatRange(0, 0.5),
    default=0.0,
    show_default=True,
    help="finetune: stochastic depth rate (timm architectures).",
)
@click.option(
    "--wise-alpha",
    type=float,
    default=None,
    help="finetune: WiSE-FT weight of the fine-tuned model (else chosen on val among 0.5-1).",
)
@click.option("--tta/--no-tta", default=False, help="finetune: also report flip-TTA test figures.")
@click.option(
    "--resize",
    type=click.IntRange(16),
    default=None,
    help="Shorter side the photos are resized to [the architecture's own; Lite2 292].",
)
@click.option(
    "--crop",
    type=click.IntRange(16),
    default=None,
    help="Square input the network sees (training crops, centre crop at evaluation) [Lite2 260].",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train: cuda (bf16 autocast, DataLoader workers), cpu, or auto (the GPU if any).",
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    type=click.Path(exists=True),
    metavar="RUN",
    help="finetune: distil from this run folder's model (repeat for an ensemble; same split).",
)
@click.option(
    "--distill-weight",
    type=click.FloatRange(0, 1),
    default=0.7,
    show_default=True,
    help="With --teacher: weight of the teachers' probabilities against the labels.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training run.")
@click.option(
    "--split-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the train/val/test split (keep it fixed to compare runs).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder [runs/<arch>-<mode>-<time>].",
)
@click.option(
    "--name", default="sortline-trashnet", show_default=True, help="Model name in the registry."
)
@click.option("--version", default=None, help="Model version [UTC time of the run].")
@click.option("--half", is_flag=True, help="Store weights as float16 (half the file size).")
@click.option(
    "--no-register", is_flag=True, help="Do not record the checkpoint in the models table."
)
@click.option(
    "--activate",
    is_flag=True,
    help="Make the registered model the active one (refused below the active one's val macro-F1).",
)
@click.option("--no-robustness", is_flag=True, help="Skip the robustness check at the end.")
def train(
    data,
    from_study,
    arch,
    mode,
    pretrained,
    epochs,
    lr,
    backbone_lr,
    batch_size,
    augment,
    balance,
    aug_views,
    ema,
    layer_decay,
    drop_path,
    wise_alpha,
    tta,
    resize,
    crop,
    device,
    teachers,
    distill_weight,
    seed,
    split_seed,
    out,
    name,
    version,
    half,
    no_register,
    activate,
    no_robustness,
) -> None:
    """Train a classifier on an ImageFolder and write a run folder with its checkpoint.

    The run folder gets the split manifest, per-epoch history, metrics (val each epoch, test
    once), a classification report, confusion matrix and curves PNGs, and model.safetensors.
    """
    from dataclasses import replace

    from training.config import get_training_settings
    from training.fit.run import RunConfig
    from training.fit.run import train as run_training
    from training.fit.train import FinetuneParams, FrozenParams

    if activate and no_register:
        raise click.UsageError("--activate needs the model registered; drop --no-register")
    settings = get_training_settings()
    study_cfg = None
    if from_study:
        study_cfg = _config_from_study(
            from_study,
            name=name,
            version=version,
            half=half,
            register=not no_register,
            robustness=not no_robustness,
            cache_dir=str(settings.cache_dir),
        )
        data, arch, mode = study_cfg.data, study_cfg.arch, study_cfg.mode
    elif not data:
        raise click.UsageError("--data is required (or --from-study NAME)")
    out = (
        out or settings.runs_dir / f"{arch}-{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    )
    frozen = FrozenParams(batch_size=batch_size)
    ft = FinetuneParams(
        batch_size=batch_size, ema_decay=ema, tta=tta, distill_weight=distill_weight,
        layer_decay=layer_decay, drop_path=drop_path,
    )  # fmt: skip
    if mode == "frozen":
        frozen = replace(
            frozen, **{k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None}
        )
    else:
        changes = {"epochs": epochs, "lr": lr, "backbone_lr": backbone_lr}
        ft = replace(ft, **{k: v for k, v in changes.items() if v is not None})
        ft = replace(
            ft,
            wise_alpha=wise_alpha,
            wise_alphas=() if wise_alpha is not None else (0.5, 0.7, 0.85, 1.0),
        )
    cfg = RunConfig(
        data=str(data),
        out=str(out),
        arch=arch,
        mode=mode,
        pretrained=pretrained,
        resize=resize,
        crop=crop,
        augment=augment,
        aug_views=aug_views,
        balance=balance,
        seed=seed,
        split_seed=split_seed,
        frozen=frozen,
        finetune=ft,
        robustness=not no_robustness,
        name=name,
        version=version,
        half=half,
        register=not no_register,
        cache_dir=str(settings.cache_dir),
        device=device,
        teachers=tuple(teachers),
    )
    if study_cfg is not None:
        cfg = replace(study_cfg, out=str(out), device=device, teachers=tuple(teachers))
        o = cfg.study
        click.echo(f"study {o['name']}: best trial {o['trial']} (val macro-F1 {o['value']:.4f})")
    cfg.validate()  # before anything is printed or written

    def progress(rec: dict) -> None:
        click.echo(
            f"epoch {rec['epoch']:>3}  train loss {rec['train_loss']:.4f}  val loss {rec['val_loss']:.4f}"
            f"  val acc {rec['val_acc']:.4f}  val macro-F1 {rec['val_macro_f1']:.4f}  ({rec['seconds']:.1f} s)"
        )

    click.echo(f"training {arch} ({mode}) on {data} -> {out}")
    summary = run_training(cfg, on_epoch=progress)
    m = summary["metrics"]
    click.echo(
        f"test: accuracy {m['test']['accuracy']:.4f}  macro-F1 {m['test']['macro_f1']:.4f}  "
        f"(n={m['test']['n']}); temperature {m['calibration']['temperature']:.3f}, "
        f"val ECE {m['calibration']['ece_before']:.4f} -> {m['calibration']['ece_after']:.4f}"
    )
    if "test_robustness" in m:
        r = m["test_robustness"]["mean_corrupted"]
        click.echo(
            f"robustness (test, mean over corruptions): accuracy {r['accuracy']:.4f}  "
            f"macro-F1 {r['macro_f1']:.4f}"
        )
    click.echo(
        f"checkpoint {summary['checkpoint']} ({summary['seconds']:.0f} s on {summary['ran_on']})"
    )
    if summary.get("registered"):
        click.echo(f"registered as {summary['registered']} (a candidate)")
        if activate:
            from sortline.commands.models import activate as activate_model

            click.echo(activate_model(summary["registered"]))


# what a study decides; `train --from-study` refuses them on the command line
_STUDY_DECIDES = (
    "data",
    "arch",
    "mode",
    "pretrained",
    "epochs",
    "lr",
    "backbone_lr",
    "batch_size",
    "augment",
    "balance",
    "aug_views",
    "seed",
    "split_seed",
)


def _config_from_study(study: str, **run_options):
    """The run configuration of `train --from-study NAME` (the study's best trial)."""
    from training.tune.runner import run_config_from_study
    from training.tune.study import quiet_optuna

    quiet_optuna()
    ctx = click.get_current_context()
    given = [
        p
        for p in _STUDY_DECIDES
        if ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if given:
        opts = ", ".join("--" + p.replace("_", "-") for p in given)
        raise click.UsageError(f"--from-study takes {opts} from the study; drop them")
    return run_config_from_study(study, out="", **run_options)


@click.command()
@checkpoint_option
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Labelled ImageFolder directory (class folders named like the model's classes).",
)
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a report.")
def evaluate(checkpoint, data, runtime, precision, as_json) -> None:
    """Score a checkpoint on a labelled ImageFolder: accuracy, macro-F1, per-class figures."""
    from training.fit.evaluate import evaluate_checkpoint, report_text
    from training.reports.metrics import with_interval
    from worker.runtime import served_classifier

    clf = served_classifier(checkpoint, runtime=runtime, precision=precision)
    m = evaluate_checkpoint(checkpoint, data, predict=clf.predict, **_review_settings(clf))
    m.update(runtime=clf.runtime, precision=clf.precision)
    refit = clf.meta.get("refit")
    if refit:  # a refit trained on every image of its split: no split of it is held out
        m["refit_of"] = refit["of"]
        click.echo(
            f"warning: {m['model']} is a refit of {refit['of']} on all {refit['images']} images "
            "of its development data: photos from that data are training photos to it, so their "
            "figures overstate it; its recipe's held-out figures are in its metadata (metrics)",
            err=True,
        )
    if as_json:
        keep = (
            "n",
            "accuracy",
            "macro_f1",
            "per_class",
            "ece",
            "model",
            "runtime",
            "precision",
            "skipped",
            "confusion",
            "intervals",
            "review_threshold",
            "unfamiliar_threshold",
            "unfamiliar_rate",
            "needs_review_rate",
            "confident_error_rate",
            "refit_of",
        )
        click.echo(json.dumps({k: m[k] for k in keep if k in m}))
        return
    classes = list(m["per_class"])
    click.echo(f"model {m['model']} ({m['runtime']} {m['precision']}) on {data}")
    click.echo(report_text(m, classes), nl=False)
    ci = m["intervals"]
    click.echo(
        f"bootstrap {ci['level']:.0%} intervals ({ci['resamples']} resamples): "
        f"accuracy {with_interval(m['accuracy'], ci['accuracy'])}, "
        f"macro-F1 {with_interval(m['macro_f1'], ci['macro_f1'])}"
    )
    click.echo(f"expected calibration error (calibrated): {m['ece']:.4f}")
    click.echo(
        f"flagged for review {m['needs_review_rate']:.1%} (unfamiliar {m['unfamiliar_rate']:.1%});"
        f" confident errors (wrong, not flagged) {m['confident_error_rate']:.1%}"
    )
    for s in m["skipped"]:
        click.echo(f"skipped {s['file']}: {s['reason']}", err=True)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@checkpoint_option
@click.option(
    "--grid",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also save a gallery PNG of the photos titled with label and confidence.",
)
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def predict(images, checkpoint, grid, runtime, precision, as_json) -> None:
    """Classify image files: label and calibrated confidence for each."""
    from sortline.commands.records import image_record
    from training.fit.evaluate import predict_files
    from training.reports.charts import gallery
    from worker.runtime import served_classifier

    missing = [str(p) for p in images if not p.exists()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    clf = served_classifier(checkpoint, runtime=runtime, precision=precision)
    results = predict_files(images, checkpoint, predict=clf.predict, **_review_settings(clf))
    served = {"runtime": clf.runtime, "precision": clf.precision}
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            if as_json:
                click.echo(json.dumps(image_record(r["file"], error=r["error"])))
            else:
                click.echo(f"{r['file']}: error: {r['error']}", err=True)
            continue
        if as_json:
            keep = (
                "label",
                "confidence",
                "probabilities",
                "unfamiliarity",
                "unfamiliar",
                "needs_review",
            )
            click.echo(json.dumps({**image_record(r["file"], **{k: r[k] for k in keep}), **served}))
        else:
            note = " unfamiliar: review" if r["unfamiliar"] else ""
            click.echo(f"{r['file']}: {r['label']} ({r['confidence']:.1%}){note}")
    if grid:
        ok = [r for r in results if "error" not in r]
        gallery([(r["image"], f"{r['label']} {r['confidence']:.0%}") for r in ok], grid, cols=4)
        if not as_json:
            click.echo(f"grid saved to {grid}")
    if failed == len(results):
        fail("no image could be read")


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option(
    "--manifest-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write manifest.csv and manifest.json here.",
)
@click.option(
    "--link",
    nargs=2,
    type=(click.Choice(["train", "val", "test"]), click.Path(file_okay=False, path_type=Path)),
    default=None,
    metavar="SPLIT OUT",
    help="Link SPLIT's images into OUT as an ImageFolder (e.g. --link test runs/split-test).",
)
def split(data: Path, seed: int, manifest_dir: Path | None, link) -> None:
    """Write a dataset's split manifest, or link one split's images into a folder.

    The split is the one `sortline train` makes (duplicate groups kept together, seed 0 by
    default), so `--link test DIR` gives the test images of a run for `sortline evaluate`.
    """
    from training.data.dataset import link_split, load_split, write_manifest

    if not manifest_dir and not link:
        raise click.UsageError("give --manifest-dir DIR and/or --link SPLIT OUT")
    ds = load_split(data, seed=seed)
    if manifest_dir:
        click.echo(write_manifest(ds, manifest_dir))
    if link:
        click.echo(link_split(ds, link[0], link[1]))


@click.command()
@click.option(
    "--data", required=True, type=click.Path(exists=True, file_okay=False), help="ImageFolder."
)
@click.option(
    "--arch",
    type=click.Choice(["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]),
    default="efficientnet_lite0",
    show_default=True,
    help="Offline backbone.",
)
@cache_dir_option
def probe(data: str, arch: str, cache_dir: Path | None) -> None:
    """Frozen-feature probe of an offline backbone's variants and normalisations on val.

    Prints one JSON line per (timm variant, normalisation): val accuracy and macro-F1 of a
    logistic regression on pooled features fitted on train.
    """
    from training.fit.probe import probe as run_probe

    run_probe(data, arch, str(_cache(cache_dir)), on_row=lambda row: click.echo(json.dumps(row)))


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Soup run folder.")
@cache_dir_option
def soup(runs: tuple[str, ...], out: str, cache_dir: Path | None) -> None:
    """Average like fine-tuned runs into one model; score members and soup on val.

    Writes a run folder that `sortline ship` takes like any other.
    """
    from training.fit.soup import make_soup

    click.echo(json.dumps(make_soup(runs, out, cache_dir=str(_cache(cache_dir))), indent=1))


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--version", required=True, help="Version of the shipped model, e.g. 1.2.0.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint to write [models/sortline-trashnet.safetensors].",
)
@cache_dir_option
@click.option("--no-robustness", is_flag=True, help="Skip the robustness check.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="With a checkpoint SOURCE: the dataset it was trained on [the one it records].",
)
def ship(
    source: str,
    version: str,
    out: str | None,
    cache_dir: Path | None,
    no_robustness: bool,
    data: str | None,
) -> None:
    """Write a run's (or a checkpoint's) float16 model as the shipped one, re-scored.

    SOURCE is a run folder, or a checkpoint file whose split is rebuilt from --data.
    """
    from training.config import DEFAULT_CHECKPOINT
    from training.fit.ship import ship as run_ship

    res = run_ship(
        source,
        data=data,
        version=version,
        out=out or DEFAULT_CHECKPOINT,
        cache_dir=str(_cache(cache_dir)),
        robustness=not no_robustness,
    )
    click.echo(json.dumps(res, indent=1))


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="The dataset SOURCE was trained on [the one it records].",
)
@click.option("--version", default=None, help="Version of the refit [UTC time].")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train (as in `sortline train`).",
)
@click.option("--no-register", is_flag=True, help="Do not record it as a candidate.")
@cache_dir_option
def refit(
    source: str,
    out: str,
    data: str | None,
    version: str | None,
    device: str,
    no_register: bool,
    cache_dir: Path | None,
) -> None:
    """Train a checkpoint's recipe again on all its split's images (train + val + test).

    The WiSE-FT weight, temperature and share of unfamiliar photos are carried over from
    SOURCE; its val/test figures stay as the recipe's. Ship the run folder with `sortline ship`.
    """
    from training.fit.refit import refit as run_refit

    def progress(rec: dict) -> None:
        click.echo(
            f"epoch {rec['epoch']:>3}  train loss {rec['train_loss']:.4f}  "
            f"train acc {rec['train_acc']:.4f}  ({rec['seconds']:.1f} s)"
        )

    click.echo(f"refitting {source} on all of its split's images -> {out}")
    summary = run_refit(
        source, out=out, data=data, version=version, cache_dir=str(_cache(cache_dir)),
        device=device, register_model=not no_register, on_epoch=progress,
    )  # fmt: skip
    r = summary["refit"]
    click.echo(
        f"checkpoint {summary['checkpoint']}: {r['images']} images, WiSE-FT weight "
        f"{r['wise_alpha']}, {summary['seconds']:.0f} s on {summary['ran_on']}"
    )
    if summary.get("registered"):
        click.echo(f"registered as {summary['registered']} (a candidate)")


def _review_settings(clf) -> dict:
    """The thresholds a worker running *clf* uses: SORTLINE_REVIEW_THRESHOLD, and the
    classifier's unfamiliarity threshold (SORTLINE_UNFAMILIAR_THRESHOLD, else the int8
    calibration's or the checkpoint's)."""
    from worker.config import get_worker_settings

    return {
        "review_threshold": get_worker_settings().review_threshold,
        "unfamiliar_override": clf.unfamiliar_threshold,
    }


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@checkpoint_option
@click.option(
    "--images",
    type=click.IntRange(10),
    default=300,
    show_default=True,
    help="Training-split images to calibrate on.",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(["minmax", "minmax-average", "percentile", "entropy"]),
    help="Calibration method to try (repeat; default: minmax and minmax-average).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
def quantize(
    data: Path, checkpoint: Path, images: int, methods: tuple[str, ...], seed: int
) -> None:
    """Calibrate a checkpoint for int8: compare calibration methods on val, keep the best."""
    from training.fit.quantize import calibrate_int8

    kw = {"methods": methods} if methods else {}
    res = calibrate_int8(checkpoint, data, images=images, seed=seed, **kw)
    click.echo(json.dumps(res, indent=1))


def _cache(cache_dir: Path | None) -> Path:
    from training.config import get_training_settings

    return cache_dir or get_training_settings().cache_dir
