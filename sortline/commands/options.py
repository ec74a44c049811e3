"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path

import click

from training.config import DEFAULT_CHECKPOINT
from training.model.factory import ARCHS

arch_option = click.option(
    "--arch",
    type=click.Choice(sorted(ARCHS)),
    default="efficientnet_lite0",
    show_default=True,
    help="Architecture from the model factory.",
)
mode_option = click.option(
    "--mode",
    type=click.Choice(["frozen", "finetune"]),
    default="frozen",
    show_default=True,
    help="frozen: linear head on cached backbone features; finetune: train the whole network.",
)
pretrained_option = click.option(
    "--pretrained",
    type=click.Choice(["auto", "offline", "hub", "none"]),
    default="auto",
    show_default=True,
    help="Where ImageNet weights come from.",
)
checkpoint_option = click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CHECKPOINT,
    show_default="models/sortline-trashnet.safetensors",
    help="Model checkpoint (.safetensors).",
)
cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache of resized images and features [SORTLINE_CACHE_DIR].",
)


def runtime_options(f):
    """``--runtime`` and ``--precision``: classify as a worker would (defaults: a CPU worker's)."""
    f = click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "int8"]),
        default="auto",
        show_default=True,
        help="ONNX Runtime precision; auto: int8 where the checkpoint has a calibration.",
    )(f)
    return click.option(
        "--runtime",
        type=click.Choice(["onnx", "torch"]),
        default="onnx",
        show_default=True,
        help="Inference runtime, as SORTLINE_RUNTIME (a CPU worker uses onnx).",
    )(f)
