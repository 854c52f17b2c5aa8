"""RabbitMQ side of the platform: provisioning leaves and publishing their notifications.

As the protocol says: per tree a vhost, per leaf a user (leaf id / session token) that
may only read its own durable queue, named after the leaf and bound to the branch's
fanout exchange. Notifications are persistent and go through the SQLite outbox, so a
broker that is down delays them instead of losing them.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from prefect_branchkey.bk_server.platform import BrokerProvisioner, LeafCredentials
from prefect_branchkey.bk_server.store import OutboxMessage, Store

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker refused or could not be reached for provisioning."""


def admin_url_from_amqp(amqp_url: str) -> str:
    """The management API URL for a broker given by its AMQP URL (same host and user, port 15672)."""
    parts = urlsplit(amqp_url)
    netloc = parts.netloc.rsplit("@", 1)
    host = netloc[-1].split(":")[0]
    auth = netloc[0] + "@" if len(netloc) == 2 else "guest:guest@"
    return urlunsplit(("http", f"{auth}{host}:15672", "", "", ""))


class RabbitProvisioner(BrokerProvisioner):
    """Creates vhosts, users, permissions, exchanges, queues and bindings via the management API."""

    def __init__(self, admin_url: str, publisher_user: str, timeout: float = 10.0) -> None:
        parts = urlsplit(admin_url)
        if parts.hostname is None:
            raise ValueError(f"the broker's management URL {admin_url!r} names no host")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._auth = (parts.username or "guest", parts.password or "guest")
        self._publisher_user = publisher_user
        self._timeout = timeout

    def _put(self, client: httpx.Client, path: str, body: dict | None = None) -> None:
        response = client.put(f"{self._base}/api/{path}", json=body or {})
        if response.status_code not in (200, 201, 204):
            raise BrokerError(f"broker refused PUT {path}: {response.status_code} {response.text[:200]}")

    def provision(self, tree_id: str, branch_id: str, leaves: list[LeafCredentials]) -> None:
        vhost = quote(tree_id, safe="")
        try:
            with httpx.Client(auth=self._auth, timeout=self._timeout) as client:
                self._put(client, f"vhosts/{vhost}")
                self._put(client, f"permissions/{vhost}/{quote(self._publisher_user, safe='')}",
                          {"configure": ".*", "write": ".*", "read": ".*"})
                self._put(client, f"exchanges/{vhost}/{quote(branch_id, safe='')}",
                          {"type": "fanout", "durable": True, "auto_delete": False})
                for leaf in leaves:
                    self._provision_leaf(client, vhost, branch_id, leaf)
        except httpx.HTTPError as exc:
            raise BrokerError(f"cannot reach the RabbitMQ management API at {self._base}: {exc}") from exc

    def _provision_leaf(self, client: httpx.Client, vhost: str, branch_id: str, leaf: LeafCredentials) -> None:
        user = quote(leaf.id, safe="")
        self._put(client, f"users/{user}", {"password": leaf.session_token, "tags": ""})
        self._put(client, f"permissions/{vhost}/{user}",
                  {"configure": "^$", "write": "^$", "read": f"^{leaf.id}$"})
        self._put(client, f"queues/{vhost}/{user}", {"durable": True, "auto_delete": False})
        response = client.post(
            f"{self._base}/api/bindings/{vhost}/e/{quote(branch_id, safe='')}/q/{user}", json={"routing_key": ""}
        )
        if response.status_code not in (200, 201, 204):
            raise BrokerError(f"broker refused binding queue {leaf.id}: {response.status_code} {response.text[:200]}")


class AmqpPublisher:
    """A background thread that drains the outbox into the branch exchanges, with confirms.

    A message leaves the outbox only after the broker confirmed it; while the broker is
    down the thread retries with backoff and the server keeps serving.
    """

    def __init__(self, amqp_url: str, store: Store, *, max_backoff_s: float = 10.0) -> None:
        self._url = amqp_url
        self._store = store
        self._max_backoff = max_backoff_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connections: dict[str, tuple[pika.BlockingConnection, BlockingChannel]] = {}
        self._thread = threading.Thread(target=self._run, name="amqp-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Drain the outbox now: a transaction has just committed a notification into it."""
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._wake.clear()
                self._drain()
                backoff = 0.5
                self._wake.wait(timeout=1.0)
                self._service_heartbeats()
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("RabbitMQ unavailable (%s); retrying in %.1f s", exc.__class__.__name__, backoff)
                self._close_all()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
        self._close_all()

    def _drain(self) -> None:
        while not self._stopping.is_set():
            batch = self._store.outbox(limit=100)
            if not batch:
                return
            for message in batch:
                self._publish_one(message)
                self._store.remove_outbox(message.id)

    def _publish_one(self, message: OutboxMessage) -> None:
        """Publish with a confirm; a message the broker can never take (no vhost or exchange) is dropped."""
        try:
            channel = self._channel(message.tree_id)
        except pika.exceptions.ProbableAccessDeniedError:
            log.error("dropping notification for branch %s: vhost %s refuses the publisher", message.branch_id,
                      message.tree_id)
            return
        try:
            channel.basic_publish(
                exchange=message.branch_id,
                routing_key="",
                body=message.body.encode(),
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                                content_type="application/json"),
            )
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._close(message.tree_id)
            if exc.reply_code in (403, 404):
                log.error("dropping notification for branch %s: the broker refuses its exchange (%s)",
                          message.branch_id, exc.reply_code)
                return
            raise

    def _channel(self, vhost: str) -> BlockingChannel:
        entry = self._connections.get(vhost)
        if entry is not None and entry[0].is_open and entry[1].is_open:
            return entry[1]
        if entry is not None and entry[0].is_open:
            connection = entry[0]
        else:
            parameters = pika.URLParameters(self._url)
            parameters.virtual_host = vhost
            parameters.heartbeat = 30
            parameters.blocked_connection_timeout = 30
            parameters.client_properties = {"connection_name": "bk-server-publisher"}
            connection = pika.BlockingConnection(parameters)
        channel = connection.channel()
        channel.confirm_delivery()
        self._connections[vhost] = (connection, channel)
        return channel

    def _service_heartbeats(self) -> None:
        for connection, _ in list(self._connections.values()):
            if connection.is_open:
                connection.process_data_events(time_limit=0)

    def _close(self, vhost: str) -> None:
        entry = self._connections.pop(vhost, None)
        if entry is None:
            return
        try:
            if entry[0].is_open:
                entry[0].close()
        except (pika.exceptions.AMQPError, OSError):
            log.debug("publisher connection to vhost %s was already gone", vhost)

    def _close_all(self) -> None:
        for vhost in list(self._connections):
            self._close(vhost)


def publisher_user(amqp_url: str) -> str:
    """The broker user the server publishes as (it needs rights on every tree's vhost)."""
    return urlsplit(amqp_url).username or "guest"
