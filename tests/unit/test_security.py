"""Issue 6, security: JSON-only Celery, code-free checkpoint loading, sha256-checked models,
allowed roots from the environment, and no secret in a settings repr or a log line."""

from __future__ import annotations

import ast
import importlib
import logging
import pickle
import subprocess
from pathlib import Path

import pytest

from db.config import SortlineSettings, mask_url
from training.model.checkpoint import CheckpointError, file_sha256, load_checkpoint, read_metadata

REPO = Path(__file__).resolve().parents[2]
SECRETS = {"broker": "brokerPW-31aa", "db": "dbPW-77c2", "flower": "flowerPW-9b1e"}

# ------------------------------------------------------------------ Celery


def test_celery_app_accepts_json_only():
    from worker.app import app

    c = app.conf
    assert c.accept_content == ["json"] and c.result_accept_content == ["json"]
    assert c.task_serializer == c.result_serializer == c.event_serializer == "json"
    assert c.task_acks_late and c.task_reject_on_worker_lost  # a lost message is requeued


# ------------------------------------------------------------------ settings and logs


def _settings_classes() -> list[type[SortlineSettings]]:
    for mod in ("db.config", "worker.config", "producer.config", "training.config"):
        importlib.import_module(mod)
    found, todo = [], [SortlineSettings]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c is not SortlineSettings]


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("SORTLINE_BROKER_URL", f"redis://:{SECRETS['broker']}@redis.internal:6379/0")
    monkeypatch.setenv(
        "SORTLINE_DATABASE_URL", f"postgresql://sortline:{SECRETS['db']}@pg.internal:5432/sortline"
    )
    monkeypatch.setenv("SORTLINE_FLOWER_USER", "admin")
    monkeypatch.setenv("SORTLINE_FLOWER_PASSWORD", SECRETS["flower"])


def test_no_secret_in_any_settings_repr_or_log(secret_env, caplog):
    classes = _settings_classes()
    assert {c.__name__ for c in classes} >= {"DbSettings", "WorkerSettings"}
    log = logging.getLogger("sortline.test")
    with caplog.at_level(logging.DEBUG):
        for cls in classes:
            s = cls()
            log.info("settings: %s", s)
            log.info("settings: %r", s)
            for text in (repr(s), str(s), f"{s}", f"{s!r}"):
                for secret in SECRETS.values():
                    assert secret not in text, (cls.__name__, text)
    for secret in SECRETS.values():
        assert secret not in caplog.text
    from worker.config import WorkerSettings

    w = WorkerSettings()
    assert "redis.internal" in repr(w) and "***" in repr(w)  # masked, not dropped
    assert w.flower_password.get_secret_value() == SECRETS["flower"]  # still usable


@pytest.mark.parametrize(
    "url",
    [
        "redis://:{pw}@host:6379/0",
        "redis://user:{pw}@host/0",
        "rediss://:{pw}@host:6380/0?ssl_cert_reqs=none",
        "postgresql+psycopg://u:{pw}@h:5432/db",
        "postgresql://u:{pw}@h/db?sslmode=require",
        "amqp://u:{pw}@h//",
        "redis://h:6379/0?password={pw}&db=1",
    ],
)
@pytest.mark.parametrize("pw", ["s3cret", "pA@sZ:wQ/rX", "xY%40yZ"])
def test_mask_url(url, pw):
    raw = url.format(pw=pw)
    masked = mask_url(raw)
    assert "***" in masked
    for piece in {pw, *pw.replace("@", " ").replace(":", " ").replace("/", " ").split()}:
        assert piece not in masked, masked


@pytest.mark.parametrize(
    "url", ["sqlite:///sortline.db", "redis+socket:///tmp/r.sock", "redis://localhost:6379/0"]
)
def test_mask_url_leaves_urls_without_secrets(url):
    assert mask_url(url) == url


def test_cli_errors_do_not_carry_the_database_password(monkeypatch):
    """A failed `sortline db upgrade` (nothing listens on port 1) shows no password."""
    from click.testing import CliRunner

    from sortline.commands.db import db

    monkeypatch.setenv("SORTLINE_DATABASE_URL", f"postgresql://u:{SECRETS['db']}@127.0.0.1:1/x")
    out = CliRunner().invoke(db, ["upgrade"])
    assert out.exit_code != 0
    assert SECRETS["db"] not in out.output
    assert SECRETS["db"] not in str(out.exception) and SECRETS["db"] not in repr(out.exception)


# ------------------------------------------------------------------ allowed roots


@pytest.mark.parametrize(
    ("value", "roots"),
    [
        ("/data/photos", ["/data/photos"]),
        ("/data/a:/data/b", ["/data/a", "/data/b"]),
        ("/data/a,/data/b", ["/data/a", "/data/b"]),
        ('["/data/a", "/data/b"]', ["/data/a", "/data/b"]),
        ("", []),
    ],
)
def test_allowed_roots_from_the_environment(monkeypatch, value, roots):
    from worker.config import WorkerSettings

    monkeypatch.setenv("SORTLINE_ALLOWED_ROOTS", value)
    assert WorkerSettings().allowed_roots == roots


def test_allowed_roots_are_resolved(tmp_path):
    from worker.config import WorkerSettings

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    s = WorkerSettings(allowed_roots=[str(tmp_path / "link")])
    assert s.resolved_roots() == [(tmp_path / "real").resolve()]


# ------------------------------------------------------------------ checkpoints


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (Path(self.marker),))


@pytest.mark.parametrize("loader", ["metadata", "checkpoint", "classifier"])
def test_pickle_disguised_as_a_checkpoint_runs_no_code(tmp_path, loader):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.safetensors"
    evil.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError):
        if loader == "metadata":
            read_metadata(evil)
        elif loader == "checkpoint":
            load_checkpoint(evil)
        else:
            from worker.runtime import Classifier

            Classifier(evil, runtime="torch")
    assert not marker.exists()


def test_torch_load_always_with_weights_only():
    """Every torch.load in the code passes weights_only=True (no pickle code execution)."""
    calls = []
    for pkg in ("db", "training", "worker", "producer", "sortline"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = (
                        isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True
                    )
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]
    bad = subprocess.run(
        [
            "grep",
            "-rnE",
            r"pickle\.loads?\(|import dill|joblib\.load",
            "db",
            "training",
            "worker",
            "producer",
            "sortline",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.stdout == "", bad.stdout


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight: the header, and so the metadata, are intact
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_tampered_checkpoint_is_refused_by_its_registered_sha256(
    tiny_model, tmp_path, sqlite_url, monkeypatch, runtime
):
    import shutil

    from db.engine import session_scope
    from db.service import register_model
    from worker.runtime import Classifier, choose_model

    path = tmp_path / "registered.safetensors"
    shutil.copy(tiny_model, path)
    meta = read_metadata(path)
    with session_scope(sqlite_url) as s:
        register_model(
            s,
            name="tiny-test",
            version="0",
            arch=meta["arch"],
            path=str(path.resolve()),
            sha256=file_sha256(path),
            classes=meta["classes"],
        )
    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    from worker.config import WorkerSettings

    settings = WorkerSettings(model=str(path), torch_threads=1)
    monkeypatch.setattr("worker.runtime.get_worker_settings", lambda: settings)
    choice = choose_model()
    assert choice.expected_sha256 == file_sha256(path)
    Classifier(choice.path, expected_sha256=choice.expected_sha256, runtime=runtime)  # intact

    _tamper(path)
    read_metadata(path)  # still a well-formed checkpoint
    with pytest.raises(CheckpointError, match="sha256"):
        Classifier(choice.path, expected_sha256=choice.expected_sha256, runtime=runtime)
