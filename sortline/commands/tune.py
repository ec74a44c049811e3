"""``sortline tune``: create or resume a study, enqueue its trials, follow it; ``tune status``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from sortline.commands.options import arch_option, mode_option, pretrained_option
from training.tune.study import PRUNERS, quiet_optuna


@click.group(invoke_without_command=True)
@click.option("--study", "name", help="Study name (created once, resumed afterwards).")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    help="ImageFolder directory, as the training workers see it.",
)
@arch_option
@mode_option
@click.option(
    "--trials",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Finished (COMPLETE or PRUNED) trials the study should have in all.",
)
@click.option(
    "--parallel",
    type=click.IntRange(0),
    default=None,
    help="Trials at once at most; 0: one per training worker [1 on SQLite, else 0].",
)
@click.option(
    "--pruner",
    type=click.Choice(PRUNERS),
    default="median",
    show_default=True,
    help="Stops trials whose val macro-F1 lags after an epoch.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=None,
    help="Epochs per trial [frozen 15]; finetune: the most the search may pick [10].",
)
@pretrained_option
@click.option("--wait", is_flag=True, help="Follow the study until it has its trials.")
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --wait: write the PNG plots here [runs/tune-<study>].",
)
@click.pass_context
def tune(
    ctx, name, data, arch, mode, trials, parallel, pruner, epochs, pretrained, wait, plots
) -> None:
    """Hyper-parameter search: Optuna trials as tasks on the training queue.

    Creates the study once (or resumes it) in the SQL database, computes the cached backbone
    features, and sends the missing trials to the `training` queue, where any number of
    `sortline worker -Q training` processes share them. `sortline tune status NAME` shows it.
    """
    quiet_optuna()
    if ctx.invoked_subcommand is not None:
        return
    if not name or not data:
        raise click.UsageError("--study and --data are required (or `sortline tune status NAME`)")
    from training.tune.runner import create_or_resume
    from training.tune.status import state_counts
    from training.tune.storage import is_sqlite, storage_url
    from training.tune.study import StudyConfig
    from worker.tasks.training import enqueue_trials

    url = storage_url()
    if parallel is None:
        parallel = 1 if is_sqlite(url) else 0
    conf = StudyConfig(
        data=data,
        arch=arch,
        mode=mode,
        trials=trials,
        parallel=parallel,
        pruner=pruner,
        epochs=epochs or (15 if mode == "frozen" else 10),
        pretrained=pretrained,
    )
    click.echo(f"study {name}: preparing features of {data} ({arch}) ...")
    t0 = time.perf_counter()
    study = create_or_resume(name, conf, url=url)
    c = state_counts(study)
    missing = max(0, trials - c["finished"] - c["RUNNING"] - c["WAITING"] - c["errors"])
    enqueue_trials(
        name, data=conf.data, arch=arch, mode=mode, n=missing, first_slot=len(study.trials)
    )
    click.echo(
        f"features ready in {time.perf_counter() - t0:.1f} s; {c['finished']} trials finished, "
        f"{missing} sent to the training queue (parallel: {parallel or 'one per worker'})"
    )
    if wait:
        _follow(name, trials, plots)


def _follow(name: str, trials: int, plots: Path | None) -> None:
    from training.config import get_training_settings
    from training.tune.runner import load_study
    from training.tune.status import best_trial, save_plots, state_counts, status_text
    from training.tune.storage import storage_url

    study = load_study(name, pruner=False)
    last = None
    try:
        while True:
            c = state_counts(study)
            b = best_trial(study)
            line = (
                f"{c['finished']}/{trials} trials done ({c['COMPLETE']} complete, {c['PRUNED']} "
                f"pruned, {c['FAIL']} failed, {c['RUNNING']} running); best "
                + ("-" if b is None else f"{b.value:.4f} (trial {b.number})")
            )
            if line != last:
                click.echo(line)
                last = line
            if c["finished"] + c["errors"] >= trials and not c["RUNNING"]:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("stopped following; the trials go on (`sortline tune status NAME`)")
        return
    click.echo(status_text(study, storage_url()))
    out = plots or get_training_settings().runs_dir / f"tune-{name}"
    for p in save_plots(study, out):
        click.echo(f"plot {p}")


@tune.command()
@click.argument("name")
@click.option(
    "--plots",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write optimisation history and parameter importances PNGs here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the trials as JSON.")
def status(name, plots, as_json) -> None:
    """A study's trials (number, state, value, params, duration, worker) and the best one."""
    import json

    from training.tune.runner import load_study
    from training.tune.status import best_trial, save_plots, status_text, trial_rows
    from training.tune.storage import storage_url

    study = load_study(name, pruner=False)
    if as_json:
        b = best_trial(study)
        best = None if b is None else {"number": b.number, "value": b.value, "params": b.params}
        click.echo(json.dumps({"trials": trial_rows(study), "best": best}))
    else:
        click.echo(status_text(study, storage_url()))
    if plots:
        for p in save_plots(study, plots):
            click.echo(f"plot {p}", err=as_json)


@tune.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the studies as JSON.")
def list_(as_json) -> None:
    """The studies in the tuning storage: name, metric, trials, best value, start."""
    import json

    from training.tune.status import list_studies

    studies = list_studies()
    if as_json:
        click.echo(json.dumps(studies))
        return
    if not studies:
        click.echo("no studies yet; `sortline tune --study NAME --data DIR ...` creates one")
        return
    click.echo(f"{'study':<20} {'metric':<14} {'trials':>6} {'best':>8}  started")
    for s in studies:
        best = "-" if s["best"] is None else f"{s['best']:.4f}"
        click.echo(
            f"{s['name']:<20} {s['metric']:<14} {s['trials']:>6} {best:>8}  {s['started'] or '-'}"
        )
