"""Issue 8 acceptance 1: docker-compose.yml against the CLI, .env.example and the secrets rule.

`docker compose config` needs a Docker engine, so the file is read with PyYAML and ${VAR}
interpolated here the way compose does (values from .env.example).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from tests.support.cli import parse_cli

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $$ is a literal $
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}")
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|PASSPHRASE", re.IGNORECASE)
SERVICES = {
    "redis",
    "postgres",
    "migrate",
    "worker-cpu",
    "worker-gpu",
    "worker-training",
    "flower",
    "producer",
}


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value, env: dict[str, str]):
    """Substitute ${VAR} forms in every string of *value*, as docker compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        val = env.get(name)
        if op.startswith(":") and not val:
            val = None
        if val is None:
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg if op.endswith("-") else ""
        return val

    parts = value.split("$$")
    return "$".join(VAR.sub(sub, p) for p in parts)


def compose(**overrides: str) -> dict:
    """The compose file with .env.example's values (secrets filled in with placeholders)."""
    env = {k: (v or f"x-{k.lower()}") for k, v in env_example().items()}
    return interpolate(raw_compose(), {**env, **overrides})


def walk(value, path=""):
    """(path, text) of every scalar in the parsed file (comments are not interpolated)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, str(value)


def variables() -> list[re.Match]:
    """Every ${VAR} form in the values of the compose file."""
    return [m for _, text in walk(raw_compose()) for m in VAR.finditer(text.replace("$$", ""))]


def sortline_services(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items() if "sortline" in str(s.get("image", ""))}


def argv_of(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def sortline_commands(doc: dict):
    """(service, where, argv) for each command and health check that runs `sortline ...`."""
    for name, svc in sortline_services(doc).items():
        yield name, "command", argv_of(svc["command"])
        test = (svc.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD" and test[1] == "sortline":
            yield name, "healthcheck", [str(a) for a in test[1:]]


def test_services():
    doc = raw_compose()
    assert set(doc["services"]) == SERVICES
    assert set(sortline_services(compose())) == SERVICES - {"redis", "postgres"}


@pytest.mark.parametrize(
    "service,where,argv", list(sortline_commands(compose())), ids=lambda v: str(v)[:20]
)
def test_command_parses_with_the_cli(service, where, argv):
    from sortline.cli import cli

    assert argv[0] == "sortline", f"{service} {where}: run sortline's CLI, not {argv[0]}"
    ctxs = parse_cli(cli, "sortline", argv[1:])
    leaf = ctxs[-1]
    assert leaf.command.callback is not None
    if service.startswith("worker-"):
        queue = service.removeprefix("worker-")
        if where == "command":
            assert leaf.info_name == "worker" and leaf.params["queues"] == queue
        else:
            assert leaf.info_name == "health"
            assert leaf.params["nodes"] == (f"sortline-{queue}@%h",)


def test_a_bad_option_is_caught():
    from sortline.cli import cli

    with pytest.raises(click.UsageError):
        parse_cli(cli, "sortline", ["worker", "-Q", "cpu", "--concurency", "2"])
    with pytest.raises(click.BadParameter):
        parse_cli(cli, "sortline", ["worker", "-Q", "cpu", "-c", "many"])
    with pytest.raises(click.UsageError):
        parse_cli(cli, "sortline", ["no-such-command"])


@pytest.mark.parametrize("queue,conc", [("cpu", 2), ("gpu", 1), ("training", 1)])
def test_what_sortline_worker_runs_parses_with_celery(queue, conc):
    """`sortline worker` execs `celery -A worker.app worker ...`: celery's CLI accepts it."""
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    from worker.health import expand_node
    from worker.stack import worker_argv

    argv = worker_argv(queue, conc, ["-l", "INFO", "--max-tasks-per-child=100"])
    assert argv[1:5] == ["-m", "celery", "-A", "worker.app"]
    # celery's group callback would load -A into ctx.obj; the worker options read it
    obj = CLIContext(app=find_app(argv[4]), no_color=True, workdir=None, quiet=True)
    ctxs = parse_cli(celery, "celery", argv[3:], obj=obj)
    leaf = ctxs[-1]
    assert leaf.info_name == "worker"
    assert leaf.params["queues"] == [queue] and leaf.params["concurrency"] == conc
    # the node name celery gives the worker is the one `health --node sortline-Q@%h` asks for
    assert leaf.params["hostname"] == expand_node(f"sortline-{queue}@%h")


def test_every_variable_is_in_env_example():
    used = {m.group(1) for m in variables()}
    example = env_example()
    assert used - set(example) == set(), "add these to .env.example"
    assert set(example) - used - {k for k in example if k.startswith("SORTLINE_")} == set(), (
        ".env.example has variables compose never uses"
    )


def test_no_secret_has_a_default():
    secrets = set()
    for m in variables():
        name, op = m.group(1), m.group(2) or ""
        if SECRET.search(name):
            secrets.add(name)
            assert op in ("", ":?", "?"), f"${{{name}}} has a default ({op})"
            assert op == ":?", f"${{{name}}} must fail when unset: use ${{{name}:?...}}"
    assert secrets >= {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"}
    example = env_example()
    for name in secrets:
        assert example[name] == "", f".env.example must leave {name} empty"
    # without them compose refuses to interpolate at all
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(raw_compose(), env_example())


def test_no_literal_secret_in_the_file():
    for path, value in walk(raw_compose()):
        key = path.rsplit(".", 1)[-1]
        if SECRET.search(key):
            assert VAR.fullmatch(value), f"{path} = {value!r}: take it from .env"
        for m in re.finditer(r"://([^:/@\s]*):([^@\s]+)@", value):
            assert VAR.fullmatch(m.group(2)), f"{path}: a password written into a URL"


def _settings_fields() -> set[str]:
    import importlib

    from db.config import SortlineSettings

    for mod in (
        "db.config",
        "worker.config",
        "producer.config",
        "training.config",
        "worker.metrics",
    ):
        importlib.import_module(mod)
    seen, todo = set(), list(SortlineSettings.__subclasses__())
    while todo:
        c = todo.pop()
        seen |= set(c.model_fields)
        todo.extend(c.__subclasses__())
    return seen


def test_every_sortline_variable_is_a_setting():
    known = _settings_fields()
    names = set()
    for svc in sortline_services(compose()).values():
        names |= {k for k in svc.get("environment", {}) if k.startswith("SORTLINE_")}
    names |= {k for k in env_example() if k.startswith("SORTLINE_")}
    unknown = {n for n in names if n.removeprefix("SORTLINE_").lower() not in known}
    assert not unknown, f"no such setting: {sorted(unknown)}"


def test_stack_shape():
    doc = compose()
    svc = doc["services"]
    env = svc["worker-cpu"]["environment"]
    # one broker and one database for every sortline container, secrets from .env
    for name, s in sortline_services(doc).items():
        assert s["environment"]["SORTLINE_BROKER_URL"] == env["SORTLINE_BROKER_URL"], name
        assert s["environment"]["SORTLINE_DATABASE_URL"] == env["SORTLINE_DATABASE_URL"], name
    assert env["SORTLINE_BROKER_URL"] == "redis://:x-redis_password@redis:6379/0"
    assert env["SORTLINE_DATABASE_URL"].startswith("postgresql://sortline:x-postgres_password@")
    # redis: password and persistence
    redis_cmd = argv_of(svc["redis"]["command"])
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == "x-redis_password"
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in svc["redis"]["volumes"])
    # postgres: its own user and a volume
    pg = svc["postgres"]
    assert pg["environment"]["POSTGRES_USER"] == "sortline"
    assert pg["environment"]["POSTGRES_PASSWORD"] == "x-postgres_password"
    assert any(v.endswith("/var/lib/postgresql/data") for v in pg["volumes"])
    # migrate runs once, before any worker
    assert svc["migrate"]["restart"] == "no"
    for name in ("worker-cpu", "worker-gpu", "worker-training", "flower", "producer"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # scalable CPU workers: no fixed name, no host port
    assert "container_name" not in svc["worker-cpu"] and "ports" not in svc["worker-cpu"]
    # GPU worker: own profile, NVIDIA reservation, CUDA image
    gpu = svc["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert gpu["environment"]["SORTLINE_DEVICE"] == "cuda"
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX"].rsplit("/", 1)[1]
    # Flower: basic auth from .env, port published
    fl = svc["flower"]
    assert fl["environment"]["SORTLINE_FLOWER_USER"] == "admin"
    assert fl["environment"]["SORTLINE_FLOWER_PASSWORD"] == "x-flower_password"
    assert fl["ports"] == ["127.0.0.1:5555:5555"]
    # the producer submits a folder mounted into every container at the same path
    mounts = {n: s.get("volumes", []) for n, s in sortline_services(doc).items()}
    for name in ("worker-cpu", "worker-gpu", "worker-training", "producer"):
        assert "./data:/data:ro" in mounts[name], name
        assert svc[name]["environment"]["SORTLINE_ALLOWED_ROOTS"] == "/data"
    assert argv_of(svc["producer"]["command"])[:3] == ["sortline", "submit", "/data"]


def test_dockerfile():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*sortline\", \"health", text, re.MULTILINE | re.DOTALL)
    assert (
        "COPY models/sortline-trashnet.safetensors models/sortline-trashnet.int8.json models/"
        in text
    )
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu$", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".env", ".venv", ".git", "*.db", "cache", "runs"):
        assert path in ignored
    assert "!models/sortline-trashnet.safetensors" in ignored
    assert "!models/sortline-trashnet.int8.json" in ignored  # the int8 calibration ships too
    # ... and the sample photos its parity check runs on
    assert "COPY samples/ samples/" in text and "samples" not in ignored
