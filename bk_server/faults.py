"""Crash points for the fault suite: with `BK_SERVER_CRASH_AT=<point>` in its environment the
server dies at once (no cleanup, as under SIGKILL) when it reaches that point, so a test can
show what survives a crash exactly there and not only where a timed kill happens to land."""

from __future__ import annotations

import os

CRASH_ENV = "BK_SERVER_CRASH_AT"
CRASH_EXIT_CODE = 137


def crash_point(point: str) -> None:
    """Die here if the environment names this point."""
    if os.environ.get(CRASH_ENV) == point:
        os._exit(CRASH_EXIT_CODE)
