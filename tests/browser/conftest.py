"""Browser tests: the HTML pages in a real headless Chromium (Debian's `chromium` package)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser.cdp import Chromium, find_chromium


@pytest.fixture(scope="session")
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install chromium); browser checks skipped")
    with Chromium(binary) as b:
        yield b


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots go: $SORTLINE_SCREENSHOTS, else a temporary folder."""
    d = os.environ.get("SORTLINE_SCREENSHOTS")
    path = Path(d) if d else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
