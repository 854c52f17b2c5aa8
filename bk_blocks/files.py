"""Atomic file writes: a file appears whole under its name, or not at all.

A write that fills the disk (ENOSPC, EDQUOT) raises `DiskFullError` naming the file, the bytes it
needs and the bytes free, after its temporary file is removed: a full disk leaves nothing behind
but the space it had, and never a partial file under the final name. A write whose size is known
beforehand is refused before its first byte when it cannot fit. `exclusively` takes turns on a
lock file between threads and processes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from prefect_branchkey.bk_blocks.errors import DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, size: int | None = None) -> Iterator[IO[Any]]:
    """Write through a temporary file beside `path` (owner-only), fsync it, rename it over `path`.

    On any error the temporary file is removed and `path` is left as it was; a full disk raises
    `DiskFullError`. With `size` (the bytes the file will take, when known) a file its
    filesystem has no room for is refused before anything is written. The handle's `name` is
    the temporary file's path, for checks before the rename.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None:
            ensure_space(path, size)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = disk_full_cause(exc) if isinstance(exc, Exception) else None
        if full is None or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(path, size, free_bytes(path), full.errno or errno.ENOSPC) from exc


def ensure_space(path: str | os.PathLike[str], size: int) -> None:
    """Raise `DiskFullError` if a file of `size` bytes at `path` cannot fit in its filesystem's
    free space: a write known to fail is refused before its first byte, not after gigabytes."""
    free = free_bytes(path)
    if free is not None and size > free:
        raise DiskFullError(path, size, free)


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """The bytes this process may still write on the filesystem holding `path` (or its nearest
    existing parent); None when the filesystem cannot say."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
    return None


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC or EDQUOT error behind `error` (itself, or an error it was raised from or while
    handling: a writer's clean-up often fails again on the full disk and hides the first one)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def remove_temporaries(directory: str | os.PathLike[str], name: str = "*") -> list[Path]:
    """Remove the temporary files `atomic_write` left (only a killed process leaves them) for
    files named `name` (a glob) under `directory`; return what was removed.

    Call it only while nothing else writes there (a server starting on its data dir, a leaf
    holding its work dir's lock): a live writer's temporary file would go too.
    """
    removed = [path for path in Path(directory).rglob(f".{name}.*.tmp") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def sha256_file(path: str | os.PathLike[str], block_bytes: int = 1 << 20) -> bytes:
    """The SHA-256 of a file, read in blocks (one streaming pass, never whole in memory)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            sha.update(block)
    return sha.digest()


@contextmanager
def exclusively(lock_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if missing): other threads and processes
    taking the same lock wait their turn."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
