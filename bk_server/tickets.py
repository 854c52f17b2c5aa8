"""WebSocket tickets (3.x): single-use and short-lived, issued over authenticated HTTP so the
WebSocket URL never carries the session token."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
import uuid

from prefect_branchkey.bk_server.errors import Unauthorized


class TicketBook:
    """The tickets issued and not yet used or expired, in memory (a restart voids them all, and
    a leaf simply asks for a new one)."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[str, str, float]] = {}

    def issue(self, leaf_id: str) -> dict[str, str]:
        """A new ticket for the leaf: `ticket_id`, `request_id` and `expires_at` (ISO 8601, UTC)."""
        ticket_id, request_id = secrets.token_urlsafe(24), str(uuid.uuid4())
        now = time.time()
        expires = now + self._ttl_s
        with self._lock:
            self._tickets = {k: v for k, v in self._tickets.items() if v[2] > now}
            self._tickets[ticket_id] = (leaf_id, request_id, expires)
        expires_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(expires)) + f".{int(expires % 1 * 1000):03d}Z"
        return {"ticket_id": ticket_id, "request_id": request_id, "expires_at": expires_at}

    def redeem(self, ticket_id: str, request_id: str) -> str:
        """Use a ticket up and return its leaf id; an unknown, used or expired one is refused (401)."""
        with self._lock:
            entry = self._tickets.pop(ticket_id, None)
        if entry is None or not hmac.compare_digest(entry[1], request_id):
            raise Unauthorized("unknown or already used WebSocket ticket")
        if entry[2] < time.time():
            raise Unauthorized("WebSocket ticket has expired")
        return entry[0]
