"""The command root: fast help without torch, typo suggestions, one line per error."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from sortline.cli import COMMANDS, cli
from tests.support.services import REPO

HEAVY = ("torch", "timm", "torchvision", "onnxruntime", "optuna", "celery", "sqlalchemy")


def test_help_lists_every_command_without_importing_any():
    """`sortline --help` loads no command module, so neither torch nor timm (issue 18, item 7)."""
    probe = (
        "import sys\n"
        "from sortline.cli import main\n"
        "sys.argv = ['sortline', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "import json\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{HEAVY!r} or m.startswith('sortline.commands.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    *help_lines, loaded = out.stdout.strip().splitlines()
    assert json.loads(loaded) == []
    listed = "\n".join(help_lines)
    for name, (_, short) in COMMANDS.items():
        assert f"  {name} " in listed and short[:30] in listed, name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_registry_help_is_the_commands_first_docstring_line(name):
    cmd = cli.get_command(click.Context(cli), name)
    assert (cmd.help or "").strip().splitlines()[0] == COMMANDS[name][1]


@pytest.mark.parametrize(
    "typo,near",
    [("sbumit", "submit"), ("stauts", "status"), ("jbos", "jobs"), ("cancle", "cancel")],
)
def test_mistyped_command_suggests_the_nearest(typo, near):
    out = CliRunner().invoke(cli, [typo])
    assert out.exit_code == 2
    assert f"No such command '{typo}'. Did you mean '{near}'?" in out.output


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_database_is_one_line_with_the_password_masked(monkeypatch):
    url = f"postgresql://sortline:hunter2@127.0.0.1:{_closed_port()}/sortline"
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    out = CliRunner().invoke(cli, ["jobs"])
    assert out.exit_code == 1
    assert out.output.count("\n") == 1 and "Traceback" not in out.output
    assert "hunter2" not in out.output
    assert f"cannot use the database {url.replace('hunter2', '***')}" in out.output
    assert "SORTLINE_DATABASE_URL" in out.output


def test_database_without_tables_says_upgrade(monkeypatch, tmp_path):
    monkeypatch.setenv("SORTLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    out = CliRunner().invoke(cli, ["status", "latest"])
    assert out.exit_code == 1
    assert "has no sortline tables" in out.output and "`sortline db upgrade`" in out.output
