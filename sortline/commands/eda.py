"""``sortline eda``: the exploratory analysis of an ImageFolder dataset (thin wrapper)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for eda.html, eda.json, images.csv and the PNG charts.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eda(data_dir: Path, out: Path, quiet: bool) -> None:
    """Analyse an ImageFolder dataset: class counts, sizes, foreground box, light, duplicates.

    Writes PNG charts, a JSON summary and one self-contained HTML page (OUT/eda.html).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from training.reports.eda import run_eda

    if quiet:
        s = run_eda(data_dir, out)
    else:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            task = bar.add_task("analysing", total=None)
            s = run_eda(
                data_dir, out, on_progress=lambda n, t: bar.update(task, completed=n, total=t)
            )
    counts = ", ".join(f"{c} {n}" for c, n in s["class_counts"].items())
    ex, nd = s["exact_duplicates"], s["near_duplicates"]
    click.echo(
        f"{s['n_images']} images in {len(s['classes'])} classes ({counts}); "
        f"imbalance ratio {s['imbalance_ratio']}"
    )
    click.echo(f"unreadable files: {len(s['integrity']['unreadable'])}")
    click.echo(f"exact duplicates: {ex['groups']} sets, {ex['cross_class']} across classes")
    click.echo(f"near-duplicate groups: {nd['groups']} ({nd['cross_class']} across classes)")
    click.echo(f"report: {out / 'eda.html'} ({s['seconds']} s)")
