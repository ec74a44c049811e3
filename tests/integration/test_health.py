"""Issue 8 acceptance 2: `sortline health` healthy, and with each dependency down.

Each check runs as the compose health check does: a fresh `sortline health` process whose
settings come from its environment, against the real Redis, PostgreSQL/SQLite and a real
Celery worker process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.support.services import REPO, CeleryWorker, create_pg_database, drop_pg_database

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict], str]:
    """Run `sortline health --json ARGS`; return the exit code, checks by name, and stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "sortline.cli", "health", "--json", "--timeout", "2", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)} if out.stdout.strip() else {}
    return out.returncode, checks, out.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    """A migrated SQLite database, the tiny model and one real CPU worker: all healthy."""
    from db.migrate import upgrade

    folder = tmp_path_factory.mktemp("health")
    url = f"sqlite:///{folder / 'sortline.db'}"
    upgrade(url)
    env = {"SORTLINE_DATABASE_URL": url, "SORTLINE_MODEL": str(tiny_model)}
    w = CeleryWorker(env, queues="cpu", log=folder / "worker.log").start()
    yield {**env, "node": w.hostname, "worker": w}
    w.stop()


def _down(checks: dict[str, dict]) -> set[str]:
    return {name for name, c in checks.items() if not c["ok"]}


@pytest.fixture(params=["sqlite", "postgresql"])
def healthy_db(request, stack):
    if request.param == "sqlite":
        yield stack["SORTLINE_DATABASE_URL"]
        return
    from db.migrate import upgrade

    url = create_pg_database()
    upgrade(url)
    yield url
    from db.engine import reset_engines

    reset_engines()
    drop_pg_database(url)


def test_healthy(stack, healthy_db):
    env = {"SORTLINE_DATABASE_URL": healthy_db, "SORTLINE_MODEL": stack["SORTLINE_MODEL"]}
    rc, checks, err = health(env, "--queue", "cpu", "--node", stack["node"])
    assert rc == 0, err
    assert set(checks) == {"broker", "database", "model", "workers"}
    assert not _down(checks)
    assert stack["node"] in checks["workers"]["detail"]
    assert "tiny-test:0" in checks["model"]["detail"]


def test_node_pattern_expands_this_host(stack):
    name = stack["node"].split("@")[0]
    env = {k: v for k, v in stack.items() if k.startswith("SORTLINE_")}
    rc, checks, err = health(env, "--check", "workers", "--node", f"{name}@%h")
    assert rc == 0, err
    assert list(checks) == ["workers"]


DOWN_CASES = {
    # what is down: (environment changes, extra arguments, checks named down, words in them)
    "broker": (
        {"SORTLINE_BROKER_URL": "redis://127.0.0.1:{port}/11"},
        (),
        {"broker", "workers"},
        "does not answer",
    ),
    "database": (
        {"SORTLINE_DATABASE_URL": "postgresql://sortline:s3cr3t-pw@127.0.0.1:{port}/sortline"},
        (),
        {"database"},
        "cannot connect",
    ),
    "database-schema": (
        {"SORTLINE_DATABASE_URL": "sqlite:///{tmp}/empty.db"},
        (),
        {"database"},
        "sortline db upgrade",
    ),
    "model-missing": ({"SORTLINE_MODEL": "{tmp}/nowhere.safetensors"}, (), {"model"}, "not found"),
    "model-corrupt": (
        {"SORTLINE_MODEL": "{tmp}/garbage.safetensors"},
        (),
        {"model"},
        "not a safetensors file",
    ),
    "worker-node": ({}, ("--node", "nobody@%h"), {"workers"}, "no answer from nobody@"),
    "worker-queue": (
        {"SORTLINE_BROKER_URL": "redis://127.0.0.1:6379/14"},  # a broker no worker uses
        ("--queue", "cpu"),
        {"workers"},
        "no worker answered",
    ),
}


@pytest.mark.parametrize("case", list(DOWN_CASES))
def test_each_dependency_down(case, stack, tmp_path):
    changes, args, expected, words = DOWN_CASES[case]
    (tmp_path / "empty.db").touch()
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    env = {k: v for k, v in stack.items() if k.startswith("SORTLINE_")}
    env |= {k: v.format(port=_free_port(), tmp=tmp_path) for k, v in changes.items()}
    rc, checks, err = health(env, *args)
    assert rc == 1
    assert _down(checks) == expected, checks
    assert set(checks) == {"broker", "database", "model", "workers"}
    detail = " ".join(checks[name]["detail"] for name in expected)
    assert words in detail
    # the one-line message names each thing that is down, and no password
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: down: ")
    assert all(f"{name} (" in last for name in expected)
    assert "s3cr3t" not in err


def test_worker_stopped_is_named(tiny_model, stack, tmp_path):
    env = {k: v for k, v in stack.items() if k.startswith("SORTLINE_")}
    w = CeleryWorker(env, queues="training", log=tmp_path / "w.log").start()
    rc, _, err = health(env, "--check", "workers", "--node", w.hostname)
    assert rc == 0, err
    w.stop()
    rc, checks, err = health(env, "--check", "workers", "--node", w.hostname)
    assert rc == 1
    assert f"no answer from {w.hostname}" in checks["workers"]["detail"]
    assert "down: workers" in err


def test_broker_password(stack, tmp_path):
    """A Redis with a password (as in the compose file): the right one passes, a wrong one is
    named, and neither is printed."""
    from tests.support.servers import RedisServer

    env = {k: v for k, v in stack.items() if k.startswith("SORTLINE_")}
    with RedisServer(tmp_path, password="s3cr3t-right") as r:
        port, right = r.port, r.url
        rc, checks, err = health({**env, "SORTLINE_BROKER_URL": right}, "--check", "broker")
        assert rc == 0, err
        assert checks["broker"]["detail"] == f"redis://:***@127.0.0.1:{port}/0"
        wrong = right.replace("right", "wrong")
        rc, checks, err = health({**env, "SORTLINE_BROKER_URL": wrong}, "--check", "broker")
        assert rc == 1
        assert "down: broker (redis://:***@" in err
        assert "s3cr3t" not in err + json.dumps(checks)
