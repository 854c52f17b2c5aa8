"""Finding the processes a test started, however deep: by a marker in their environment."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path


def new_marker() -> tuple[str, str]:
    """A fresh environment variable (name, value) to hand to the processes a test starts."""
    return "BRANCHKEY_TEST_RUN", uuid.uuid4().hex


def processes_with(marker: tuple[str, str]) -> list[int]:
    """Pids of live processes (other than this one) whose environment carries the marker."""
    needle = f"{marker[0]}={marker[1]}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            if not zombie and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def left_running(marker: tuple[str, str], timeout: float = 15) -> list[int]:
    """The marked processes still alive after up to `timeout` seconds (a SIGKILLed group takes a moment)."""
    deadline = time.monotonic() + timeout
    while (found := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def assert_none_left(marker: tuple[str, str]) -> None:
    """Fail, naming them, if marked processes outlived a teardown (killing them first, so one
    failing test leaves nothing behind for the next)."""
    leftovers = left_running(marker)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running after the teardown: {leftovers}"
