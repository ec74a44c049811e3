"""``sortline adapt``: refit a model on a site's reviewed photos; register it as a candidate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sortline.commands.options import DEFAULT_CHECKPOINT, cache_dir_option


@click.command()
@click.option(
    "--reviewed",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="ImageFolder of corrected photos (what `sortline review import` leaves).",
)
@click.option(
    "--base",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_CHECKPOINT,
    show_default="models/sortline-trashnet.safetensors",
    help="Checkpoint to adapt.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the new checkpoint [runs/adapt-VERSION].",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The base model's training ImageFolder, replayed [the one its checkpoint records].",
)
@click.option(
    "--replay",
    type=click.IntRange(1),
    default=None,
    help="Training images replayed beside the reviewed ones [all of the training split].",
)
@click.option(
    "--mode",
    type=click.Choice(["finetune", "head"]),  # training.fit.adapt.MODES (imports torch)
    default="finetune",
    show_default=True,
    help="finetune: train the network (all but its first layers) a few hundred steps "
    "(minutes); head: refit the classifier head only on cached features (seconds, smaller "
    "gains).",
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=None,
    help="With --mode finetune: at most this many training steps of 16 photos [600].",
)
@click.option(
    "--budget",
    type=click.FloatRange(0),
    default=None,
    help="With --mode finetune: seconds for the whole adaptation; on a slower machine fewer "
    "steps run, so it ends in time (0: no limit) [540].",
)
@cache_dir_option
@click.option("--activate", is_flag=True, help="Make the new version the active model.")
@click.option(
    "--force", is_flag=True, help="With --activate: even below the active model's val macro-F1."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def adapt(
    reviewed: Path,
    base: Path,
    out: Path | None,
    data: Path | None,
    replay: int | None,
    mode: str,
    steps: int | None,
    budget: float | None,
    cache_dir: Path | None,
    activate: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Teach a model a site's reviewed photos (--reviewed DIR) in minutes; register the new version."""
    from training.config import get_training_settings
    from training.fit.adapt import AdaptParams
    from training.fit.adapt import adapt as run_adapt

    params = AdaptParams(mode=mode, replay=replay)
    if steps:
        params.steps = steps
    if budget is not None:
        params.budget = budget
    summary = run_adapt(
        reviewed, base, out, data=data, params=params,
        cache_dir=cache_dir or get_training_settings().cache_dir,
        progress=None if as_json else lambda line: click.echo(line, err=True),
    )  # fmt: skip
    if activate:
        from sortline.commands.models import activate as activate_model

        summary["activated"] = activate_model(summary["registered"], force=force)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(
        f"{summary['model']} from {summary['base']} ({summary['mode']}): {summary['reviewed']} "
        "reviewed photos + "
        f"{summary['replay']} replayed, {summary['seconds']:.0f} s; val accuracy "
        f"{summary['val_accuracy']:.4f}; checkpoint {summary['checkpoint']}"
    )
    click.echo(summary.get("activated") or f"registered as a candidate: `sortline models "
               f"activate {summary['registered']}` makes it the active model")  # fmt: skip
