"""`sortline --help` is fast: it lists the registry and imports no command module."""

from __future__ import annotations

import json
import subprocess
import sys

from sortline.cli import COMMANDS
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
