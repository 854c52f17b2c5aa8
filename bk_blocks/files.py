"""Atomic file writes: a file appears whole under its name, or not at all."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Write through a temporary file beside `path` (owner-only), fsync it, rename it over `path`.

    On any error the temporary file is removed and `path` is left as it was. The handle's
    `name` is the temporary file's path, for checks before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
