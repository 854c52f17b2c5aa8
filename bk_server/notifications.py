"""Fan-out of platform notifications to leaves: WebSocket connections and RabbitMQ.

Both transports carry the same JSON text. WebSocket delivery is live only (a leaf that
is not connected misses it, as on the real platform, and catches up from the run details'
`latest_aggregation`); AMQP delivery goes through the durable outbox, written in the
same transaction as the change it announces, and the leaf's durable queue, so it waits
for a leaf that is offline and survives a server killed at any moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from prefect_branchkey.bk_blocks.protocol import AGGREGATION_STATUS, RUN_STATUS
from prefect_branchkey.bk_server.store import Store

log = logging.getLogger(__name__)


def aggregation_message(aggregation_id: str, **extra: Any) -> str:
    return json.dumps({"message_type": AGGREGATION_STATUS, "body": {"aggregation_id": aggregation_id, **extra}})


def run_status_message(status: str, **extra: Any) -> str:
    return json.dumps({"message_type": RUN_STATUS, "body": {"run_status": status, **extra}})


class WebSocketHub:
    """Per-leaf queues of the open WebSocket connections, fed from any thread."""

    def __init__(self) -> None:
        self._queues: dict[str, set[asyncio.Queue[str]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def register(self, leaf_id: str) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        with self._lock:
            self._queues.setdefault(leaf_id, set()).add(queue)
        return queue

    def unregister(self, leaf_id: str, queue: asyncio.Queue[str]) -> None:
        with self._lock:
            queues = self._queues.get(leaf_id, set())
            queues.discard(queue)
            if not queues:
                self._queues.pop(leaf_id, None)

    def publish(self, leaf_ids: Iterable[str], text: str) -> None:
        with self._lock:
            targets = [queue for leaf_id in leaf_ids for queue in self._queues.get(leaf_id, ())]
        if not targets or self._loop is None or self._loop.is_closed():
            return
        for queue in targets:
            self._loop.call_soon_threadsafe(queue.put_nowait, text)


class AmqpSink(Protocol):
    def wake(self) -> None: ...


class Notifier:
    """Sends one notification to every leaf of a branch over every configured transport, in two
    steps: `stage` inside the transaction that makes the change, `deliver` once it committed."""

    def __init__(self, hub: WebSocketHub, amqp: AmqpSink | None) -> None:
        self.hub = hub
        self.amqp = amqp

    def stage(self, db: sqlite3.Connection, tree_id: str, branch_id: str, text: str) -> None:
        """Queue the AMQP copy in the outbox within the caller's transaction."""
        if self.amqp is not None:
            Store.insert_outbox(db, tree_id, branch_id, text)

    def deliver(self, branch_id: str, leaf_ids: Iterable[str], text: str) -> None:
        """Send the WebSocket copies and let the AMQP publisher drain what `stage` queued."""
        log.info("notify branch %s: %s", branch_id, text)
        self.hub.publish(leaf_ids, text)
        if self.amqp is not None:
            self.amqp.wake()
