"""`sortline worker` hands the Celery options it does not define to `celery worker`."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.support.cli import parse_cli


def _exec_argv(monkeypatch, args: list[str]) -> list[str]:
    seen: list[list[str]] = []
    monkeypatch.setattr("os.execv", lambda path, argv: seen.append(argv))
    out = CliRunner().invoke(cli, ["worker", *args])
    assert out.exit_code == 0, out.output
    return seen[0]


def test_celery_options_pass_through_and_parse_with_celery(monkeypatch):
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    argv = _exec_argv(
        monkeypatch,
        ["--queues", "cpu", "-P", "threads", "-c", "8", "-n", "belt@%h", "--autoscale=8,2"],
    )
    obj = CLIContext(app=find_app("worker.app"), no_color=True, workdir=None, quiet=True)
    leaf = parse_cli(celery, "celery", argv[3:], obj=obj)[-1]
    assert leaf.info_name == "worker"
    assert leaf.params["pool"].__module__ == "celery.concurrency.thread"
    assert leaf.params["concurrency"] == 8
    assert leaf.params["hostname"].startswith("belt@") and leaf.params["autoscale"] == (8, 2)
    assert leaf.params["queues"] == ["cpu"]


def test_a_mistyped_option_is_refused_with_the_nearest():
    with pytest.raises(click.NoSuchOption) as e:
        parse_cli(cli, "sortline", ["worker", "-Q", "cpu", "--concurency", "2"])
    assert "Did you mean '--concurrency'?" in e.value.format_message()
    out = CliRunner().invoke(cli, ["worker", "--autoscal", "8,2"])
    assert out.exit_code == 2 and "Did you mean '--autoscale'?" in out.output
