"""Worker commands: ``worker``, ``flower``, ``up``, ``down``."""

from __future__ import annotations

import difflib
import os
import sys

import click

from sortline.cli import fail
from sortline.names import QUEUES
from worker import stack


class CeleryPassThrough(click.Command):
    """A command that hands the options it does not define to `celery worker`, by name checked."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)
        from celery.bin.worker import worker as celery_worker

        known = {o for p in celery_worker.params for o in (*p.opts, *p.secondary_opts)}
        for arg in ctx.args:
            if not arg.startswith("-") or arg == "-":
                continue  # the value of the option before it
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
            if name not in known:
                ours = {o for p in self.params for o in p.opts}
                near = difflib.get_close_matches(arg.split("=", 1)[0], sorted(known | ours), n=1)
                raise click.NoSuchOption(arg, possibilities=near, ctx=ctx)
        return rest


@click.command(
    cls=CeleryPassThrough,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option(
    "-Q", "--queues", default="cpu", show_default=True, help="cpu, gpu, training (comma-separated)."
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, 256),
    help="Processes (default: cores; 1 for gpu).",
)
@click.option(
    "--max-tasks-per-child", type=click.IntRange(1), help="Restart a process after N tasks."
)
@click.option("-l", "--loglevel", default="INFO", show_default=True, help="Celery log level.")
@click.pass_context
def worker(
    ctx: click.Context,
    queues: str,
    concurrency: int | None,
    max_tasks_per_child: int | None,
    loglevel: str,
) -> None:
    """Run a Celery worker on QUEUES (same as `celery -A worker.app worker -Q ...`).

    Any other `celery worker` option is passed on as it is, e.g. `-P threads -c 8` (one
    process, eight task threads), `-n NAME@%h` or `--autoscale 8,2`.
    """
    bad = [q for q in queues.split(",") if q not in QUEUES]
    if bad:
        raise click.BadParameter(f"unknown queue {bad[0]!r}; use cpu, gpu or training")
    if concurrency is None and queues in ("gpu", "training"):
        concurrency = 1
    if "gpu" in queues.split(","):
        os.environ.setdefault("SORTLINE_DEVICE", "cuda")  # falls back to CPU with a warning
    extra = ["-l", loglevel]
    if max_tasks_per_child:
        extra.append(f"--max-tasks-per-child={max_tasks_per_child}")
    argv = stack.worker_argv(queues, concurrency, [*extra, *ctx.args])
    sys.stdout.flush()
    os.execv(argv[0], argv)


@click.command()
@click.option("--port", type=int, help="Port (default SORTLINE_FLOWER_PORT, 5555).")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
def flower(port: int | None, address: str) -> None:
    """Run Flower against sortline's Celery app (basic auth from SORTLINE_FLOWER_USER/PASSWORD)."""
    from worker.config import get_worker_settings

    argv, env = stack.flower_argv(port or get_worker_settings().flower_port, address)
    os.environ.update(env)
    os.execv(argv[0], argv)


@click.command()
@click.option("-c", "--concurrency", type=click.IntRange(1, 64), help="Worker processes.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--training", is_flag=True, help="Also a training-queue worker (as in compose).")
def up(concurrency: int | None, no_flower: bool, training: bool) -> None:
    """Start the local stack: Redis (if none answers), one CPU worker and Flower."""
    started = stack.up(concurrency=concurrency, flower=not no_flower, training=training)
    for s in started:
        click.echo(f"started {s.name:<7} pid {s.pid:<7} log {s.log}")
    if not no_flower:
        from worker.config import get_worker_settings

        click.echo(f"Flower: http://127.0.0.1:{get_worker_settings().flower_port}")


@click.command()
def down() -> None:
    """Stop what `sortline up` started."""
    stopped = stack.down()
    click.echo("stopped " + ", ".join(stopped) if stopped else "nothing was running")


@click.command()
@click.option(
    "--check",
    "checks",
    multiple=True,
    type=click.Choice(["broker", "database", "model", "workers"]),
    help="Only this check (repeatable; default: all four).",
)
@click.option(
    "-Q",
    "--queue",
    "queues",
    multiple=True,
    type=click.Choice(QUEUES),
    help="Some worker must consume this queue (repeatable).",
)
@click.option(
    "--node", "nodes", multiple=True, help="This worker must answer, e.g. sortline-cpu@%h."
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60),
    default=3.0,
    show_default=True,
    help="Seconds to wait for each answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def health(checks, queues, nodes, timeout, as_json) -> None:
    """Check the broker, database, model and workers; exit 1 naming what is down."""
    import json

    from worker.health import CHECKS, run_checks

    results = run_checks(checks or CHECKS, queues=queues, nodes=nodes, timeout=timeout)
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in results]))
    else:
        for c in results:
            click.echo(f"{'ok' if c.ok else 'DOWN':<5} {c.name:<9} {c.detail}")
    down = [c for c in results if not c.ok]
    if down:
        fail("down: " + "; ".join(f"{c.name} ({c.detail})" for c in down))
