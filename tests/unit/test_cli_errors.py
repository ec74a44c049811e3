"""Errors a user causes leave the CLI in one place: one line on stderr, an exit code, no traceback."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from sortline.cli import LazyGroup, cli
from sortline.errors import ConfigError, NotFound, SortlineError


@pytest.fixture
def runner(sqlite_url, monkeypatch):
    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    return CliRunner()


def _one_line(out) -> str:
    text = out.stderr if hasattr(out, "stderr") else out.output
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_a_missing_job_is_one_line(runner):
    out = runner.invoke(cli, ["status", "0123abcd"])
    assert out.exit_code == 1
    assert "no job '0123abcd'" in _one_line(out)


def test_a_dataset_error_from_the_library_is_one_line(runner, tmp_path):
    (tmp_path / "empty").mkdir()
    out = runner.invoke(
        cli, ["eda", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert out.exit_code == 1
    assert "has no class folders" in _one_line(out)


class _Down(SortlineError):
    exit_code = 3


@pytest.mark.parametrize(
    "error, code",
    [(NotFound("no model 'x'"), 1), (ConfigError("bad value"), 1), (_Down("broker down"), 3)],
)
def test_every_sortline_error_is_handled_by_the_root(error, code):
    """A command raising any SortlineError gets its message and the class's exit code."""

    class Root(LazyGroup):  # the root's error handling, with an ordinary command table
        get_command = click.Group.get_command
        list_commands = click.Group.list_commands
        resolve_command = click.Group.resolve_command

    @click.group(cls=Root)
    def root() -> None:
        pass

    @root.command()
    def boom() -> None:
        raise error

    out = CliRunner().invoke(root, ["boom"])
    assert out.exit_code == code
    assert str(error) in _one_line(out)
    assert out.exception is None or isinstance(out.exception, SystemExit)


@pytest.mark.parametrize(
    "typo,near",
    [("sumbit", "submit"), ("stauts", "status"), ("jbos", "jobs"), ("cancle", "cancel")],
)
def test_a_mistyped_command_suggests_the_nearest(runner, typo, near):
    out = runner.invoke(cli, [typo, "x"])
    assert out.exit_code == 2
    assert f"No such command '{typo}'. Did you mean '{near}'?" in out.output


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_database_is_one_line_with_the_password_masked(monkeypatch):
    url = f"postgresql://sortline:hunter2@127.0.0.1:{_closed_port()}/sortline"
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    out = CliRunner().invoke(cli, ["jobs"])
    assert out.exit_code == 1
    line = _one_line(out)
    assert "hunter2" not in out.output
    assert f"cannot use the database {url.replace('hunter2', '***')}" in line
    assert "SORTLINE_DATABASE_URL" in line


def test_a_database_without_tables_says_upgrade(monkeypatch, tmp_path):
    monkeypatch.setenv("SORTLINE_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    out = CliRunner().invoke(cli, ["status", "latest"])
    assert out.exit_code == 1
    line = _one_line(out)
    assert "has no sortline tables" in line and "`sortline db upgrade`" in line
