"""A small real filesystem for a test: a tmpfs of a given size mounted on a directory, unmounted after.

Mounting needs root (or CAP_SYS_ADMIN). Where it is not permitted the test is skipped with the
reason, unless CI=true: there a missing capability is a failure, not a skip. Nothing the test
wrote outlives the unmount.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .bkserver import in_ci

BALLAST = ".ballast"
_BLOCK = b"\0" * (1 << 20)


@dataclass(frozen=True)
class SmallDisk:
    """A mounted tmpfs: its directory, and a ballast file that fills it up to a chosen point."""

    root: Path
    size_bytes: int

    def free(self) -> int:
        """Bytes free on it now."""
        return shutil.disk_usage(self.root).free

    def fill(self, leave_bytes: int) -> Path:
        """Write a ballast file (real bytes: tmpfs allocates nothing for a sparse file) so that about
        `leave_bytes` stay free (tmpfs counts whole pages); return it."""
        ballast = self.root / BALLAST
        remaining = self.free() - leave_bytes
        with open(ballast, "ab") as handle:
            while remaining > 0:
                remaining -= handle.write(_BLOCK[:remaining])
        return ballast

    def free_up(self) -> None:
        """Remove the ballast: the space a test's user would free."""
        (self.root / BALLAST).unlink(missing_ok=True)


@contextmanager
def small_disk(directory: Path, size_bytes: int) -> Iterator[SmallDisk]:
    """Mount a tmpfs of `size_bytes` on `directory` (created if missing) for the block's duration."""
    directory.mkdir(parents=True, exist_ok=True)
    reason = _mount(directory, size_bytes)
    if reason is not None:
        _cannot_mount(f"cannot mount a tmpfs of {size_bytes:,} bytes on {directory}: {reason}")
    try:
        yield SmallDisk(directory, size_bytes)
    finally:
        _unmount(directory)


def _mount(directory: Path, size_bytes: int) -> str | None:
    """Mount the tmpfs; the reason it could not be, or None."""
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs",
                                 str(directory)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")


def _unmount(directory: Path) -> None:
    """Unmount it; lazily (detached now, freed once the last open file closes) if it is still busy."""
    if subprocess.run(["umount", str(directory)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], check=True, capture_output=True, timeout=30)


def _cannot_mount(message: str) -> None:
    """Fail under CI=true, else skip loudly: the disk-full tests need a filesystem they can fill."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing capability is a failure; run the tests as root)")
    warnings.warn(f"SKIPPING disk-full tests: {message}. Run them as root (or with CAP_SYS_ADMIN).", stacklevel=2)
    pytest.skip(message)
