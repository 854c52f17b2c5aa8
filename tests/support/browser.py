"""Debian's headless Chromium against the Prefect UI: a page's DOM after its scripts ran, its text,
and, for a failure's reader, the DOM kept and a screenshot of a page that lacked what was expected."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .bkserver import in_ci

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
# Chromium's virtual time for a page's scripts, per attempt: a busy machine answers the UI's API
# calls slowly, so each attempt allows more (a page that rendered returns at the first).
VIRTUAL_TIME_BUDGETS_MS = (20_000, 40_000, 80_000, 120_000)


def find_chromium() -> str:
    """Debian's Chromium (`.ci/run` installs it); a failure in CI, a loud skip elsewhere."""
    path = shutil.which("chromium")
    if path:
        return path
    if in_ci():
        pytest.fail("chromium is not installed (CI=true: .ci/run installs Debian's chromium)")
    pytest.skip("SKIPPING browser test: chromium is not installed (apt-get install chromium)")


def render(chromium: str, url: str, tmp_path: Path, screenshot: str, expect: str) -> str:
    """The page's DOM after its scripts ran (asked again with a longer virtual time budget while it
    lacks `expect`: on a busy machine the page may not have rendered within the first), kept in
    tmp_path beside `screenshot`, a screenshot taken only when the page never showed `expect`."""
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    dom = ""
    for budget in VIRTUAL_TIME_BUDGETS_MS:
        dom = subprocess.run([*command, f"--virtual-time-budget={budget}", "--dump-dom", url], capture_output=True,
                             text=True, timeout=60 + budget / 1000).stdout
        if expect in dom:
            break
    (tmp_path / screenshot).with_suffix(".html").write_text(dom)
    if expect not in dom:
        subprocess.run([*command, f"--virtual-time-budget={budget}", f"--screenshot={tmp_path / screenshot}", url],
                       capture_output=True, timeout=60 + budget / 1000)
    return dom


def page_text(dom: str) -> str:
    """A DOM's visible text, tags dropped and whitespace folded."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def render_text(chromium: str, url: str, tmp_path: Path, name: str, expect: str) -> str:
    """`render`'s page as its visible text; its DOM (and screenshot) kept in tmp_path as `name`."""
    return page_text(render(chromium, url, tmp_path, f"{name}.png", expect))
