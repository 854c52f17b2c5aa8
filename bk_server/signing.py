"""Pre-signed download URLs: expiring, scoped to one aggregate of one branch, signed with a key
kept owner-only in the data dir (so URLs stay valid across a restart)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path

from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.bk_server.errors import Forbidden


class DownloadSigner:
    """Signs and checks the query of a download URL (`branch_id`, `expires`, `signature`)."""

    def __init__(self, key_path: Path, ttl_s: float) -> None:
        self._key = _load_or_create_key(key_path)
        self._ttl_s = ttl_s

    def sign(self, file_id: str, branch_id: str, now: float | None = None) -> dict[str, str]:
        """The query parameters of a URL for `file_id` that expires `ttl_s` from now."""
        expires = str(int((now or time.time()) + self._ttl_s))
        return {"branch_id": branch_id, "expires": expires, "signature": self._signature(file_id, branch_id, expires)}

    def check(self, file_id: str, branch_id: str, expires: str, signature: str) -> None:
        """Refuse (403) a URL whose signature does not hold or that has expired."""
        if not hmac.compare_digest(self._signature(file_id, branch_id, expires), signature):
            raise Forbidden("download URL signature is invalid")
        if not expires.isdigit() or int(expires) < time.time():
            raise Forbidden("download URL has expired; ask for a new one")

    def _signature(self, file_id: str, branch_id: str, expires: str) -> str:
        message = f"{file_id}\n{branch_id}\n{expires}".encode()
        return base64.urlsafe_b64encode(hmac.new(self._key, message, hashlib.sha256).digest()).decode().rstrip("=")


def _load_or_create_key(path: Path) -> bytes:
    """The key that signs download URLs, kept owner-only in the data dir across restarts."""
    if path.exists():
        return path.read_bytes()
    key = secrets.token_bytes(32)
    with atomic_write(path) as handle:
        handle.write(key)
    return key
