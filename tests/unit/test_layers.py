"""The import direction of the packages, checked over the source (every import, lazy ones too).

db <- training.model <- training.data <- training.reports <- training.fit <- training.tune
<- worker <- producer <- sortline.commands / sortline.cli; sortline.errors and sortline.names
import nothing of the project and may be imported from anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("db", "training", "worker", "producer", "sortline")
LEAVES = ("sortline.errors", "sortline.names")

# unit -> the project units it must never import (a unit is a package or sub-package)
FORBIDDEN = {
    "db": ("training", "worker", "producer", "sortline.cli", "sortline.commands"),
    "training.model": ("training.data", "training.fit", "training.tune", "training.reports"),
    "training.data": ("training.fit", "training.tune", "training.reports"),
    "training.reports": ("training.fit", "training.tune"),
    "training.fit": ("training.tune",),
    "training": ("worker", "producer", "sortline.cli", "sortline.commands"),
    "worker": ("producer", "sortline.cli", "sortline.commands"),
    "producer": ("sortline.cli", "sortline.commands"),
}
# what the worker may use of training
WORKER_MAY_IMPORT = ("training.model", "training.config", "training.tune.runner")
NO_TORCH = ("db", "producer", "training.reports", "sortline.errors", "sortline.names")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every module *path* imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _within(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def _unit(module: str) -> str:
    parts = module.split(".")
    return (
        ".".join(parts[:2]) if parts[0] in ("training", "sortline") and len(parts) > 1 else parts[0]
    )


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module):
    imports = _imports(MODULES[module], module)
    project = {i for i in imports if i.split(".")[0] in PACKAGES}
    for unit, banned in FORBIDDEN.items():
        if not _within(module, unit):
            continue
        for name in project:
            if any(_within(name, leaf) for leaf in LEAVES):
                continue
            bad = [b for b in banned if _within(name, b)]
            assert not bad, f"{module} imports {name}: {unit} must not import {bad[0]}"
    if _within(module, "worker"):
        used = {n for n in project if n.startswith("training.")}
        stray = [n for n in used if not any(_within(n, ok) for ok in WORKER_MAY_IMPORT)]
        assert not stray, f"{module} imports {stray}: the worker uses only {WORKER_MAY_IMPORT}"
    if any(_within(module, u) for u in LEAVES):
        assert not project - {module}, f"{module} must import nothing of the project"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if any(_within(m, u) for u in NO_TORCH))
)
def test_no_torch_in_torch_free_layers(module):
    imports = _imports(MODULES[module], module)
    assert not {i for i in imports if i.split(".")[0] in ("torch", "torchvision", "timm")}, module


def test_no_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        src = _unit(module)
        for name in _imports(path, module):
            if (
                name.split(".")[0] in PACKAGES
                and name in MODULES
                or name.rsplit(".", 1)[0] in MODULES
            ):
                dst = _unit(name)
                if dst != src and not any(_within(name, leaf) for leaf in LEAVES):
                    graph.setdefault(src, set()).add(dst)
    seen, stack = set(), []

    def visit(n: str) -> None:
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
        if n in seen:
            return
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_reports_and_producer_load_without_torch():
    mods = sorted(m for m in MODULES if _within(m, "training.reports") or _within(m, "producer"))
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing these loaded {out.stdout.strip()}"


def test_the_checks_catch_a_violation(tmp_path):
    """The checks are not vacuous: a db module importing the worker is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from worker.runtime import get_classifier\n")
    assert "worker.runtime" in _imports(bad, "db.bad")
    banned = FORBIDDEN["db"]
    assert any(_within("worker.runtime", b) for b in banned)
