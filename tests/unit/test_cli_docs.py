"""Documentation is tested: every command has help text and appears in the README."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sortline.cli import COMMANDS, cli

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _walk(cmd: click.Command, path: list[str]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, [*path, name])


def _all_commands():
    ctx = click.Context(cli)
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        assert cmd is not None, f"command {name} does not load"
        yield from _walk(cmd, [name])


@pytest.mark.parametrize("path", [p for p, _ in _all_commands()], ids=" ".join)
def test_command_has_help_and_is_in_readme(path):
    out = CliRunner().invoke(cli, [*path, "--help"])
    assert out.exit_code == 0, out.output
    cmd = dict((tuple(p), c) for p, c in _all_commands())[tuple(path)]
    assert (cmd.help or "").strip(), f"`sortline {' '.join(path)}` has no help text"
    assert f"sortline {' '.join(path)}" in README, f"`sortline {' '.join(path)}` not in README"


def _settings_classes():
    import importlib

    from db.config import SortlineSettings

    for mod in ("db.config", "worker.config", "producer.config", "training.config"):
        importlib.import_module(mod)
    seen, todo = [], list(SortlineSettings.__subclasses__())
    while todo:
        c = todo.pop()
        seen.append(c)
        todo.extend(c.__subclasses__())
    return seen


@pytest.mark.parametrize("cls", _settings_classes(), ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme_table(cls):
    for name in cls.model_fields:
        var = f"`SORTLINE_{name.upper()}`"
        assert f"| {var} |" in README, f"{var} ({cls.__name__}) missing from the README table"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_registry_short_help_is_the_commands_own(name):
    """`sortline --help` lists the registry's text without importing commands: keep them equal."""
    cmd = cli.get_command(click.Context(cli), name)
    assert COMMANDS[name][1] == (cmd.help or "").strip().splitlines()[0]
