"""Platform notifications behind one interface, over AMQP (2.x) or WebSocket (3.x).

A listener runs in a background thread, reconnects with backoff when the broker or the
socket goes away, and never exits the process. It stops only for what a reconnect cannot
fix: refused credentials, an untrusted TLS certificate, a proxy refusing the tunnel
(`failure`, raised by every later wait). Both transports take the client's `Egress` (CA
bundle and proxy: `bk_blocks/network.py`); over AMQP a proxy's CONNECT tunnel reaches pika
through a loopback port. Aggregation notices are kept in order
with a sequence number; `wait_for_aggregation(after=mark)` returns the first notice that
arrived after a mark taken before the upload, so a notice left over from an earlier
round is never mistaken for the answer. Over AMQP a notice is acknowledged only once it
has been handed over (passed over as stale, returned, or with `auto_ack=False` once the
caller calls `acknowledge()`), so a crash before that leaves it in the leaf's durable
queue; a redelivered notice keeps its place in the order.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import requests
from websockets.exceptions import InvalidProxyStatus, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from prefect_branchkey.bk_blocks.errors import (
    AuthenticationError,
    BranchKeyError,
    CertificateError,
    NotificationTimeout,
    ProxyRefusedError,
    error_for_response,
)
from prefect_branchkey.bk_blocks.network import (
    FINAL_PROXY_STATUS,
    Egress,
    LoopbackTunnel,
    environment_proxy,
    open_tunnel,
    origin,
)
from prefect_branchkey.bk_blocks.outages import OutageLog
from prefect_branchkey.bk_blocks.protocol import AGGREGATION_STATUS, RUN_STATUS

log = logging.getLogger(__name__)

_BACKLOG_SETTLE_S = 0.3
# What ends a listener instead of a reconnect: a retry meets the same refusal.
FINAL_FAILURES = (AuthenticationError, CertificateError, ProxyRefusedError)


@dataclass(frozen=True)
class AggregationNotice:
    """An `aggregation_status` notice: the aggregate's id plus any extra body fields."""

    aggregation_id: str
    sequence: int
    received_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def closed_round(self) -> tuple[int, int] | None:
        """The (run, round) this aggregation closed, when the body says so (bk_server's extra
        fields); None from a platform that sends only the aggregation id."""
        run_number, round_number = self.extra.get("run_number"), self.extra.get("round")
        if isinstance(run_number, int) and isinstance(round_number, int):
            return run_number, round_number
        return None


@dataclass
class _Pending:
    notice: AggregationNotice
    ack: Callable[[], None]


def _no_ack() -> None:
    return None


def _closed_before(notice: AggregationNotice, for_round: tuple[int, int] | None) -> bool:
    """Whether a notice names a round earlier than the one waited for (it can never answer it)."""
    closed = notice.closed_round
    return for_round is not None and closed is not None and closed < for_round


class NotificationListener:
    """What both transports share: parsing, ordering, waiting, run status, acks."""

    transport = "none"

    def __init__(self, *, on_run_status: Callable[[str], None] | None = None, max_backoff_s: float = 30.0,
                 keepalive_s: float = 20.0) -> None:
        self._on_run_status = on_run_status
        self._max_backoff = max_backoff_s
        self.keepalive_s = keepalive_s
        self._outage = OutageLog(f"{self.transport} notifications", log)
        self._lock = threading.Condition()
        self._pending: list[_Pending] = []
        self._handed_over: set[str] = set()
        self._awaiting_ack: dict[str, Callable[[], None]] = {}
        self._sequence = 0
        self._connected = threading.Event()
        self._settled = threading.Event()
        self._stopping = threading.Event()
        self._handler: Callable[[AggregationNotice], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"bk-{self.transport}-listener", daemon=True)
        self.run_status: str | None = None
        self.connections = 0
        self.failure: BranchKeyError | None = None

    def start(self) -> NotificationListener:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._interrupt()
        self._thread.join(timeout=10)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected and any backlog delivered on connecting has arrived."""
        return self._settled.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def mark(self) -> int:
        """A position in the notice stream: take it before uploading, pass it as `after`."""
        with self._lock:
            return self._sequence

    def set_handler(self, handler: Callable[[AggregationNotice], None] | None) -> None:
        """Hand every new aggregation notice to `handler` (then acknowledge it) instead of keeping it."""
        with self._lock:
            self._handler = handler

    def wait_for_aggregation(
        self, timeout: float, *, after: int | None = None, exclude: Iterable[str] = (), auto_ack: bool = True,
        for_round: tuple[int, int] | None = None,
    ) -> AggregationNotice:
        """The aggregation notice that answers an upload, not in `exclude`.

        A notice that names the (run, round) it closed answers `for_round` (the round the
        upload counts in) exactly. Otherwise: the first notice received after `after` (a
        `mark()`), or with `after=None` the most recent pending one (what a leaf resuming
        after a crash wants: the latest aggregation it has not handled). Notices passed
        over are acknowledged and dropped. With `auto_ack=False` the returned notice stays
        unacknowledged (over AMQP: redelivered after a crash) until `acknowledge()`.
        """
        excluded = set(exclude)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self.failure is not None:
                    raise self.failure
                chosen = self._choose(after, excluded, auto_ack, for_round)
                if chosen is not None:
                    return chosen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotificationTimeout(
                        f"no aggregation notice within {timeout:.0f} s over {self.transport}"
                        + ("" if self.connected else " (not connected: still trying)")
                    )
                self._lock.wait(remaining)

    def acknowledge(self, aggregation_id: str) -> None:
        """Acknowledge a notice returned with `auto_ack=False`, once its result is safely stored."""
        with self._lock:
            ack = self._awaiting_ack.pop(aggregation_id, None)
            self._handed_over.add(aggregation_id)
        if ack is not None:
            ack()

    def _choose(self, after: int | None, excluded: set[str], auto_ack: bool,
                for_round: tuple[int, int] | None) -> AggregationNotice | None:
        """Pick the notice to return from the pending ones; ack and drop the stale ones."""
        candidates = [p for p in self._pending if p.notice.aggregation_id not in excluded]
        exact = [p for p in candidates if for_round is not None and p.notice.closed_round == for_round]
        unnamed = [p for p in candidates if for_round is None or p.notice.closed_round is None]
        if exact:
            chosen: _Pending | None = exact[0]
        elif after is None:
            chosen = unnamed[-1] if unnamed else None
        else:
            chosen = next((p for p in unnamed if p.notice.sequence > after), None)
        if chosen is None:
            stale = [p for p in self._pending if (after is not None and p.notice.sequence <= after)
                     or _closed_before(p.notice, for_round)]
        else:
            stale = [p for p in self._pending if p.notice.sequence < chosen.notice.sequence]
            self._pending.remove(chosen)
            if auto_ack:
                self._handed_over.add(chosen.notice.aggregation_id)
                chosen.ack()
            else:
                self._awaiting_ack[chosen.notice.aggregation_id] = chosen.ack
        for entry in stale:
            self._pending.remove(entry)
            self._handed_over.add(entry.notice.aggregation_id)
            entry.ack()
        return chosen.notice if chosen is not None else None

    def _receive(self, text: str | bytes, ack: Callable[[], None]) -> None:
        """Parse one message; keep aggregation notices, apply run status, ignore the rest."""
        try:
            message = json.loads(text)
            kind, body = message["message_type"], message.get("body") or {}
        except (ValueError, KeyError, TypeError):
            kind, body = None, None
        if not isinstance(body, dict):
            log.warning("ignoring a notification that is not JSON with a message_type and an object body")
            ack()
        elif kind == RUN_STATUS and isinstance(body.get("run_status"), str):
            self.run_status = body["run_status"]
            log.info("run status is now %s", self.run_status)
            if self._on_run_status is not None:
                self._on_run_status(self.run_status)
            ack()
        elif kind == AGGREGATION_STATUS and isinstance(body.get("aggregation_id"), str):
            self._keep(body, ack)
        else:
            log.warning("ignoring notification of unknown type %r", kind)
            ack()

    def _keep(self, body: dict[str, Any], ack: Callable[[], None]) -> None:
        """Keep a new notice in order; a redelivered one keeps its place and takes the new ack."""
        aggregation_id = body["aggregation_id"]
        with self._lock:
            if aggregation_id in self._handed_over:
                ack()
                return
            if aggregation_id in self._awaiting_ack:
                self._awaiting_ack[aggregation_id] = ack
                return
            for entry in self._pending:
                if entry.notice.aggregation_id == aggregation_id:
                    entry.ack = ack
                    return
            self._sequence += 1
            notice = AggregationNotice(aggregation_id, self._sequence, time.time(),
                                       {k: v for k, v in body.items() if k != "aggregation_id"})
            log.info("aggregation %s announced over %s", aggregation_id, self.transport)
            if self._handler is not None:
                self._handler(notice)
                self._handed_over.add(aggregation_id)
                ack()
            else:
                self._pending.append(_Pending(notice, ack))
            self._lock.notify_all()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._session()
                backoff = 0.5
            except FINAL_FAILURES as exc:
                log.error("%s notifications failed: %s; not retrying", self.transport, exc)
                with self._lock:
                    self.failure = exc
                    self._lock.notify_all()
                self._settled.set()
                break
            except Exception as exc:
                if self._stopping.is_set():
                    break
                self._outage.failed(f"{type(exc).__name__}: {exc}", backoff)
            finally:
                self._connected.clear()
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _settle_after_connect(self) -> None:
        self.connections += 1
        self._outage.ended()
        self._connected.set()
        if not self._settled.is_set():
            threading.Timer(_BACKLOG_SETTLE_S, self._settled.set).start()

    def _session(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        raise NotImplementedError


class _ListenerLossAtDebug(logging.Filter):
    """pika's error lines for a connection lost in the listener's own thread, at DEBUG: the
    listener reconnects from that and logs the outage itself, once (other pika users keep theirs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.current_thread().name == f"bk-{AmqpListener.transport}-listener":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


for _name in ("pika.adapters.blocking_connection", "pika.adapters.base_connection",
              "pika.adapters.utils.io_services_utils", "pika.adapters.utils.connection_workflow"):
    logging.getLogger(_name).addFilter(_ListenerLossAtDebug())


class AmqpListener(NotificationListener):
    """2.x transport: the leaf's durable queue on its tree's vhost, consumed with manual acks."""

    transport = "amqp"

    def __init__(self, *, host: str, port: int, tree_id: str, leaf_id: str, session_token: str,
                 use_tls: bool = False, egress: Egress | None = None, connect_timeout_s: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._host, self._port, self._use_tls = host, port, use_tls
        self._egress = egress or Egress(ca_bundle=None, verify_tls=True, proxy_url=None, proxies=None)
        self._connect_timeout = connect_timeout_s
        self._vhost, self._credentials = tree_id, pika.PlainCredentials(leaf_id, session_token)
        self._queue = leaf_id
        self._connection: pika.BlockingConnection | None = None
        self._tunnel: LoopbackTunnel | None = None
        if not self._egress.proxy_url and environment_proxy(host):
            log.info("AMQP connects directly to %s:%d: the proxy of the environment (HTTPS_PROXY) covers HTTP and "
                     "WebSocket only; set proxy_url to tunnel AMQP through it too", host, port)

    @property
    def where(self) -> str:
        """The broker, as errors name it."""
        return f"{'amqps' if self._use_tls else 'amqp'}://{self._host}:{self._port}"

    def _parameters(self, host: str, port: int) -> pika.ConnectionParameters:
        """pika's parameters for a connection to host:port (the broker, or the loopback end of a
        tunnel to it); TLS always checks the broker's own name."""
        context = self._egress.ssl_context() if self._use_tls else None
        return pika.ConnectionParameters(
            host=host, port=port, virtual_host=self._vhost, credentials=self._credentials,
            heartbeat=max(1, round(self.keepalive_s)), blocked_connection_timeout=60, connection_attempts=1,
            socket_timeout=self._connect_timeout,
            ssl_options=pika.SSLOptions(context, self._host) if context is not None else None,
            client_properties={"connection_name": f"leaf-{self._queue}"},
        )

    def _connect(self) -> pika.BlockingConnection:
        """A connection to the broker, directly or through the proxy's tunnel; an untrusted
        certificate or a refused tunnel is final, refused credentials too on a first connection."""
        parameters = self._parameters(self._host, self._port)
        if self._egress.proxy_url:
            upstream = open_tunnel(self._egress, self._host, self._port, self._connect_timeout)
            try:
                self._tunnel = LoopbackTunnel(upstream, accept_timeout=self._connect_timeout)
            except BaseException:
                upstream.close()
                raise
            parameters = self._parameters("127.0.0.1", self._tunnel.port)
        try:
            return pika.BlockingConnection(parameters)
        except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
            if self.connections:
                raise ConnectionError(f"RabbitMQ refused the leaf for now ({type(exc).__name__})") from None
            raise AuthenticationError(f"RabbitMQ refused the leaf's credentials ({type(exc).__name__})") from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            final = self._egress.final_error(exc, self.where)
            if final is not None:
                raise final from None
            raise

    def _session(self) -> None:
        try:
            connection = self._connect()
        except BaseException:
            self._close_tunnel()
            raise
        self._connection = connection
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1000)

            def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
                self._receive(body, _amqp_ack(connection, ch, method.delivery_tag))

            channel.basic_consume(self._queue, on_message, auto_ack=False)
            self._settle_after_connect()
            log.info("listening for notifications on AMQP queue of leaf %s", self._queue)
            while not self._stopping.is_set() and connection.is_open:
                connection.process_data_events(time_limit=0.5)
        finally:
            self._connection = None
            try:
                if connection.is_open:
                    connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass
            self._close_tunnel()

    def _close_tunnel(self) -> None:
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.close()

    def _interrupt(self) -> None:
        return None


def _amqp_ack(connection: pika.BlockingConnection, channel: Any, tag: int) -> Callable[[], None]:
    """An ack callable safe to call from any thread, and harmless once the channel is gone
    (the broker then redelivers the message, which the listener de-duplicates)."""

    def ack_in_connection_thread() -> None:
        if channel.is_open:
            channel.basic_ack(tag)

    def ack() -> None:
        try:
            connection.add_callback_threadsafe(ack_in_connection_thread)
        except (pika.exceptions.AMQPError, OSError):
            log.debug("notice %s not acked: its connection is gone; it will be redelivered", tag)

    return ack


class _KeepaliveFailureAtDebug(logging.LoggerAdapter[logging.Logger]):
    """The WebSocket library's logger with its "keepalive ping failed" error (and traceback) at
    DEBUG: a dead connection is what the listener reconnects from, and it says so itself, once."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if msg == "keepalive ping failed" else level, msg, *args, **kwargs)


_WIRE_LOG = _KeepaliveFailureAtDebug(logging.getLogger("websockets.client"), {})


class WebSocketListener(NotificationListener):
    """3.x transport: a single-use ticket, then one WebSocket; a fresh ticket per reconnect."""

    transport = "websocket"

    def __init__(self, *, ticket: Callable[[], dict[str, str]], ws_base: str, open_timeout: float = 10.0,
                 egress: Egress | None = None, **kwargs: Any) -> None:
        self._ticket = ticket
        self._ws_base = ws_base.rstrip("/")
        self._open_timeout = open_timeout
        self._egress = egress or Egress(ca_bundle=None, verify_tls=True, proxy_url=None, proxies=None)
        self._socket: ClientConnection | None = None
        super().__init__(**kwargs)

    def _session(self) -> None:
        data = self._ticket()
        url = f"{self._ws_base}/api/v1/ws?ticket={data['ticket_id']}&request_id={data['request_id']}"
        secure = url.startswith("wss:")
        try:
            socket = ws_connect(url, open_timeout=self._open_timeout, ping_interval=self.keepalive_s,
                                ping_timeout=self.keepalive_s, close_timeout=5, logger=_WIRE_LOG,
                                ssl=self._egress.ssl_context() if secure else None,
                                proxy=self._egress.websocket_proxy)
        except InvalidStatus as exc:
            raise ConnectionError(f"WebSocket refused with HTTP {exc.response.status_code}") from None
        except InvalidProxyStatus as exc:
            status, reason = exc.response.status_code, exc.response.reason_phrase
            if status in FINAL_PROXY_STATUS:
                raise self._egress.proxy_refused(status, reason, self._ws_base) from None
            raise ConnectionError(f"the proxy could not open a tunnel to {origin(self._ws_base)}: "
                                  f"{status} {reason}") from None
        except (OSError, WebSocketException) as exc:
            final = self._egress.final_error(exc, self._ws_base)
            if final is not None:
                raise final from None
            raise ConnectionError(f"WebSocket to {origin(self._ws_base)} not opened: "
                                  f"{type(exc).__name__}: {exc}") from None
        self._socket = socket
        try:
            self._settle_after_connect()
            log.info("listening for notifications on the WebSocket")
            for text in socket:
                self._receive(text, _no_ack)
        except WebSocketException as exc:
            raise ConnectionError(f"WebSocket closed: {exc}") from None
        finally:
            self._socket = None
            socket.close()
        if not self._stopping.is_set():
            raise ConnectionError("WebSocket closed by the server")

    def _interrupt(self) -> None:
        socket = self._socket
        if socket is not None:
            socket.close()


def ticket_fetcher(session: requests.Session, url: str, headers: dict[str, str], timeout: tuple[float, float],
                   egress: Egress) -> Callable[[], dict[str, str]]:
    """A function that asks the platform for a fresh WebSocket ticket (the listener thread's own
    session), through the client's proxy and with its CA bundle."""

    def fetch() -> dict[str, str]:
        try:
            response = session.post(url, headers=headers, timeout=timeout, verify=egress.requests_verify,
                                    proxies=egress.requests_proxies)
        except requests.RequestException as exc:
            final = egress.final_error(exc, url)
            if final is not None:
                raise final from None
            raise ConnectionError(f"WebSocket ticket: {type(exc).__name__} talking to {origin(url)}") from None
        if response.status_code != 200:
            error = error_for_response(response.status_code, response.content, response.reason or "",
                                       "WebSocket ticket")
            if isinstance(error, AuthenticationError):
                raise error
            raise ConnectionError(str(error))
        return response.json()["data"]

    return fetch
