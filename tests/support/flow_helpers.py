"""Helpers for flow tests: read artifacts and events back from the test Prefect server."""

from __future__ import annotations

import time
from typing import Any

from .http import LOCAL


def artifacts(api: str, key: str) -> list[dict[str, Any]]:
    """Every version of the artifact with this key, newest first."""
    response = LOCAL.post(f"{api}/artifacts/filter",
                          json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})
    response.raise_for_status()
    return response.json()


def events(api: str, name: str, resource_id: str, expected: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Events of this name about this resource, waiting until `expected` of them are stored."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = LOCAL.post(f"{api}/events/filter", json={
            "filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]},
                       "occurred": {"since": "2000-01-01T00:00:00Z"}},
            "limit": 50,
        })
        response.raise_for_status()
        found = response.json()["events"]
        if len(found) >= expected:
            return found
        time.sleep(0.5)
    return found
