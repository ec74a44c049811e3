"""``sortline report``: the HTML report of a job, of a training run, or of several runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("job", required=False)
@click.option(
    "--run",
    "runs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A `sortline train` run folder instead of a job; repeat it to compare runs.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the HTML page (report.html, run.html or compare.html) and its PNGs.",
)
def report(job: str | None, runs: tuple[Path, ...], out: Path) -> None:
    """Write an HTML report of a finished job (JOB: id, prefix or 'latest'), or of runs.

    A job's page shows its label distribution, confidence histogram, the lowest-confidence
    images, its errors and, where the images lie in folders named after classes, the accuracy,
    per-class figures and confusion matrix against those names. With --run DIR, the page of a
    training run; with several --run, one page comparing them.
    """
    if bool(job) == bool(runs):
        raise click.UsageError("give either JOB or one or more --run DIR")
    if runs:
        from training.reports.run import compare_runs, run_report

        page = run_report(runs[0], out) if len(runs) == 1 else compare_runs(runs, out)
        click.echo(f"report: {page}")
        return
    from producer.report import job_report

    rep = job_report(job, out)
    line = f"job {rep['job']['job_id']}: {rep['n_ok']} labelled, {rep['n_errors']} errors"
    m = rep.get("labelled")
    if m:
        line += f"; accuracy {m['accuracy']:.4f} over {m['n']} images in class-named folders"
    click.echo(line)
    click.echo(f"report: {out / 'report.html'}")
