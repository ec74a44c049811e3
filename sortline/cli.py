"""The ``sortline`` console script: a thin root that loads each package's commands lazily."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

# command name -> "module:attribute"; modules are imported only when their command runs,
# so `sortline --help` and the producer commands never import torch.
COMMANDS: dict[str, str] = {
    "db": "db.cli:db",
    "submit": "producer.cli:submit",
    "stream": "producer.cli:stream",
    "status": "producer.cli:status",
    "results": "producer.cli:results",
    "jobs": "producer.cli:jobs",
    "worker": "worker.cli:worker",
    "flower": "worker.cli:flower",
    "up": "worker.cli:up",
    "down": "worker.cli:down",
    "health": "worker.cli:health",
    "train": "training.cli:train",
    "evaluate": "training.cli:evaluate",
    "predict": "training.cli:predict",
    "tune": "worker.tune_cli:tune",
    "eda": "training.eda_cli:eda",
    "report": "producer.report_cli:report",
    "review": "producer.review_cli:review",
}


class UserError(click.ClickException):
    """An error the user can fix; printed as one line, never a traceback."""


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        from db.service import NotFound
        from training.checkpoint import CheckpointError
        from training.imaging import ImageError

        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # e.g. `sortline results JOB | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            ctx.exit(0)
        except (NotFound, CheckpointError, ImageError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        except ConnectionError as e:
            raise UserError(f"cannot connect: {e}") from None


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
