"""``sortline review export`` and ``sortline review import``: the human review loop."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def review() -> None:
    """Review doubtful results: export them into class folders, move misfiled ones, import."""


@review.command("export")
@click.argument("job")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to fill: one sub-folder per class, images under their predicted label.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=None,
    help="Export images with confidence below this (default: those marked needs_review).",
)
def export(job: str, out: Path, threshold: float | None) -> None:
    """Copy a job's images awaiting review into OUT/<predicted label>/ (JOB: id, prefix, 'latest').

    Move each misfiled image into the folder of its right class (delete the ones to leave
    alone), then run `sortline review import OUT`.
    """
    from producer.review import export_review

    m = export_review(job, out, threshold=threshold)
    click.echo(f"exported {len(m['items'])} images of job {m['job_id']} to {out}")
    for s in m["skipped"]:
        click.echo(f"skipped position {s['position']} ({s['ref']}): {s['reason']}", err=True)


@review.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--add-to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also copy the reviewed images into this ImageFolder training directory.",
)
def import_(folder: Path, add_to: Path | None) -> None:
    """Record the labels of a reviewed export FOLDER: each image's folder is its label."""
    from producer.review import import_review

    r = import_review(folder, add_to=add_to)
    click.echo(
        f"job {r['job_id']}: {len(r['changed'])} labels changed, {r['confirmed']} confirmed"
        + (f", {r['added']} images added to {add_to}" if add_to else "")
    )
    for c in r["changed"]:
        click.echo(f"  {c['file']}: {c['from']} -> {c['to']}")
    for key, what in (
        ("missing", "not found (left as it was)"),
        ("unknown_folder", "in a folder that is no class (skipped)"),
        ("ambiguous", "found in several folders (skipped)"),
    ):
        for f in r[key]:
            click.echo(f"  {f}: {what}", err=True)
