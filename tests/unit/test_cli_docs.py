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


def _readme_command_lines() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every `sortline ...` in the README's shell blocks, comments,
    pipes, `&&`, `;` and a trailing `&` taken apart (``docker compose run ... sortline``
    included)."""
    import re
    import shlex

    found, shell = [], False
    for n, line in enumerate(README.splitlines(), 1):
        fence = re.match(r"^```(\w*)", line)
        if fence:
            shell = not shell and fence.group(1) in ("sh", "bash", "console")
            continue
        if not shell:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("|", "&", "&&", ";", "||"):
                if "sortline" in segment:
                    found.append((n, segment[segment.index("sortline") + 1 :]))
                segment = []
            else:
                segment.append(token)
    return found


README_COMMANDS = _readme_command_lines()


def test_the_readme_shows_the_streaming_and_tuning_commands():
    shown = {" ".join(argv[:2]) for _, argv in README_COMMANDS}
    assert {"worker --queues", "stream", "stream --watch", "results --follow"} <= shown
    assert {"worker -Q", "tune --study", "tune status", "train --from-study"} <= shown
    assert {"submit /data/photos", "results latest"} <= shown  # the compose block


@pytest.mark.parametrize(
    "argv", [a for _, a in README_COMMANDS], ids=[f"L{n}" for n, _ in README_COMMANDS]
)
def test_every_readme_command_parses_with_the_cli(argv, monkeypatch):
    """Each command in the README's shell blocks is accepted as written (nothing is run)."""
    from tests.support.cli import parse_cli

    for _, cmd in _all_commands():  # paths in the examples need not exist on this machine
        for p in cmd.params:
            if isinstance(p.type, click.Path):
                monkeypatch.setattr(p.type, "exists", False)
    leaf = parse_cli(cli, "sortline", argv)[-1]
    assert leaf.command.callback is not None
