"""The ``sortline`` console script: a thin root that loads each command's module lazily."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

import click

from sortline.errors import SortlineError

# command name -> ("sortline.commands.<module>:<attribute>", short help). The short help is
# known here so that `sortline --help` lists every command without importing any of them
# (several import torch); tests/unit/test_cli_docs.py checks it matches each command's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "db": ("db:db", "Manage the database schema (SORTLINE_DATABASE_URL)."),
    "submit": (
        "jobs:submit",
        "Classify image files, folders or globs (PATHS) as one job; print its id.",
    ),
    "stream": (
        "jobs:stream",
        "Submit images as they arrive: paths on stdin (one per line), or new files in --watch DIR.",
    ),
    "status": (
        "jobs:status",
        "Show a job's progress, its labels so far and its queue's depth (JOB: id, prefix or 'latest').",
    ),
    "results": ("jobs:results", "Print a job's per-image results (JOB: id, prefix or 'latest')."),
    "jobs": ("jobs:jobs", "List the newest jobs."),
    "cancel": (
        "jobs:cancel",
        "Cancel a job: drop its queued messages, revoke its tasks; rows already written stay.",
    ),
    "close": (
        "jobs:close",
        "Close a streaming job left open; it is done once every image it received has a row.",
    ),
    "worker": (
        "worker:worker",
        "Run a Celery worker on QUEUES (same as `celery -A worker.app worker -Q ...`).",
    ),
    "flower": (
        "worker:flower",
        "Run Flower against sortline's Celery app (basic auth from SORTLINE_FLOWER_USER/PASSWORD).",
    ),
    "up": (
        "worker:up",
        "Start the local stack: Redis (if none answers), one CPU worker and Flower.",
    ),
    "down": ("worker:down", "Stop what `sortline up` started."),
    "health": (
        "worker:health",
        "Check the broker, database, model and workers; exit 1 naming what is down.",
    ),
    "train": (
        "train:train",
        "Train a classifier on an ImageFolder and write a run folder with its checkpoint.",
    ),
    "evaluate": (
        "train:evaluate",
        "Score a checkpoint on a labelled ImageFolder: accuracy, macro-F1, per-class figures.",
    ),
    "predict": ("train:predict", "Classify image files: label and calibrated confidence for each."),
    "split": (
        "train:split",
        "Write a dataset's split manifest, or link one split's images into a folder.",
    ),
    "probe": (
        "train:probe",
        "Frozen-feature probe of an offline backbone's variants and normalisations on val.",
    ),
    "soup": (
        "train:soup",
        "Average like fine-tuned runs into one model; score members and soup on val.",
    ),
    "refit": (
        "train:refit",
        "Train a checkpoint's recipe again on all its split's images (train + val + test).",
    ),
    "ship": (
        "train:ship",
        "Write a run's (or a checkpoint's) float16 model as the shipped one, re-scored.",
    ),
    "models": (
        "models:models",
        "List the registered model versions with their metrics; * marks the active one.",
    ),
    "quantize": (
        "train:quantize",
        "Calibrate a checkpoint for int8: compare calibration methods on val, keep the best.",
    ),
    "tune": ("tune:tune", "Hyper-parameter search: Optuna trials as tasks on the training queue."),
    "eda": (
        "eda:eda",
        "Analyse an ImageFolder dataset: class counts, sizes, foreground box, light, duplicates.",
    ),
    "report": (
        "report:report",
        "Write an HTML report of a finished job (JOB: id, prefix or 'latest'), or of runs.",
    ),
    "adapt": (
        "adapt:adapt",
        "Teach a model a site's reviewed photos (--reviewed DIR) in minutes; register the new version.",
    ),
    "review": (
        "review:review",
        "Review doubtful results: export them into class folders, move misfiled ones, import.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported only when one runs (or its own help is asked for)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(f"sortline.commands.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            near = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            ctx.fail(f"No such command '{name}'.{hint} `sortline --help` lists the commands.")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # e.g. `sortline results JOB | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            ctx.exit(0)
        except SortlineError as e:
            fail(str(e), e.exit_code)
        except FileNotFoundError as e:
            fail(str(e), 1)
        except ConnectionError as e:
            fail(f"cannot connect: {e}", 1)
        except Exception as e:
            package = type(e).__module__.split(".")[0]
            if package in ("kombu", "redis", "amqp"):
                fail(f"cannot reach the broker ({e}); is Redis running? `sortline up` starts one")
            if package == "sqlalchemy":
                problem = _database_problem(e)
                if problem:
                    fail(problem)
            raise


def _database_problem(e: Exception) -> str | None:
    """One line for a database that cannot be reached or has no tables, else None."""
    from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

    from db.config import get_db_settings, mask_url

    if not isinstance(e, OperationalError | InterfaceError | ProgrammingError):
        return None
    url = mask_url(get_db_settings().database_url)
    reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
    if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
        return f"database {url} has no sortline tables ({reason}); run `sortline db upgrade`"
    if isinstance(e, ProgrammingError):
        return None
    return (
        f"cannot use the database {url} ({reason}); check that it is running and that "
        "SORTLINE_DATABASE_URL is right (`sortline health --check database`)"
    )


def fail(message: str, exit_code: int = 1) -> None:
    """Print one error line on stderr and exit: the one place errors leave the CLI."""
    exc = click.ClickException(message)
    exc.exit_code = exit_code
    raise exc from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="sortline")
def cli(verbose: int) -> None:
    """sortline: classify photos of waste into recycling classes through a queue."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    cli(prog_name="sortline")


if __name__ == "__main__":
    main()
