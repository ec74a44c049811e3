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
