"""Count the Prefect API calls this process makes: HTTP requests by method and path, events by name.

Prefect's clients send every HTTP request through `PrefectHttpxAsyncClient.send` or
`PrefectHttpxSyncClient.send` (run states, logs, artifacts, reads), and every event through
`PrefectEventsClient._emit` (over one WebSocket: task-run states, our round events). Wrapping
those three methods counts what reaches the server without touching the server.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class CallCounter:
    """Thread-safe tallies: `http[(method, path)]` with ids as `{id}`, and `events[name]`."""

    def __init__(self) -> None:
        self.http: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count_request(self, method: str, path: str) -> None:
        key = f"{method} {UUID.sub('{id}', path)}"
        with self._lock:
            self.http[key] += 1

    def count_event(self, name: str) -> None:
        with self._lock:
            self.events[name] += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"http": dict(self.http), "events": dict(self.events)}


@contextmanager
def counting_prefect_calls() -> Iterator[CallCounter]:
    """Count the Prefect API calls made by this process (every thread) while the block runs."""
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
    from prefect.events.clients import PrefectEventsClient

    counter = CallCounter()
    async_send, sync_send, emit = PrefectHttpxAsyncClient.send, PrefectHttpxSyncClient.send, PrefectEventsClient._emit

    async def counted_async_send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count_request(request.method, request.url.path)
        return await async_send(self, request, *args, **kwargs)

    def counted_sync_send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count_request(request.method, request.url.path)
        return sync_send(self, request, *args, **kwargs)

    async def counted_emit(self: Any, event: Any) -> None:
        counter.count_event(event.event)
        await emit(self, event)

    PrefectHttpxAsyncClient.send = counted_async_send  # type: ignore[method-assign]
    PrefectHttpxSyncClient.send = counted_sync_send  # type: ignore[method-assign]
    PrefectEventsClient._emit = counted_emit  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        PrefectHttpxAsyncClient.send = async_send  # type: ignore[method-assign]
        PrefectHttpxSyncClient.send = sync_send  # type: ignore[method-assign]
        PrefectEventsClient._emit = emit  # type: ignore[method-assign]
