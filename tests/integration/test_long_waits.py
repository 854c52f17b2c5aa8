"""A leaf that waits long for the other sites: its notification connection lives on its own
keepalives, the wait logs nothing per keepalive, and a connection that dies silently mid-wait
(a NAT that forgets it) is noticed, reconnected and caught up, with one line for the outage.

Hours are compressed into seconds: the waiting leaf's keepalive is 1 s (`keepalive_s`), the
server pings WebSocket clients every 0.5 s, and the wait spans many keepalive windows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.tasks import LeafSession, upload_weights, wait_for_aggregation

from ..support.bkserver import BkServer, credentials_for
from ..support.tcp_relay import TcpRelay

KEEPALIVE_S = 1.0
WAIT_S = 8.0
WEBSOCKET_UPGRADE = b"Upgrade: websocket"


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """The tasks here run against the session's Prefect server."""


@pytest.fixture(params=["websocket", "amqp"])
def pinging_server(request: pytest.FixtureRequest, make_server: Callable[..., BkServer]) -> tuple[str, BkServer]:
    """A server that pings WebSocket clients every 0.5 s, and the transport to use with it."""
    if request.param == "amqp":
        request.getfixturevalue("rabbitmq")
    return request.param, make_server(amqp=request.param == "amqp", ws_ping_interval=0.5)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The log records of the test, the package's own from INFO up."""
    caplog.set_level(logging.INFO, logger="prefect_branchkey")
    return caplog


def _waiting_leaf(server: BkServer, leaf: dict[str, str], transport: str,
                  relay: TcpRelay | None = None) -> BranchKeyCredentials:
    """The waiting leaf's Block: a 1 s keepalive, its notifications through `relay` if given."""
    credentials = credentials_for(server, leaf, transport)
    update: dict[str, object] = {"keepalive_s": KEEPALIVE_S}
    if relay is not None and transport == "amqp":
        update.update(amqp_port=relay.port)
    elif relay is not None:
        update.update(host=f"http://127.0.0.1:{relay.port}")
    return credentials.model_copy(update=update)


def _upload_later(session: LeafSession, path: Path, delay_s: float) -> threading.Timer:
    timer = threading.Timer(delay_s, session.client.upload, args=(path,))
    timer.start()
    return timer


def _bk_lines(records: list[logging.LogRecord], since: int) -> list[str]:
    return [r.getMessage() for r in records[since:] if r.name.startswith("prefect_branchkey")]


def test_long_wait_keeps_one_connection_and_logs_no_line_per_keepalive(
        pinging_server: tuple[str, BkServer], update_file: Callable[..., Path],
        open_session: Callable[..., LeafSession], logs: pytest.LogCaptureFixture) -> None:
    transport, server = pinging_server
    federation = server.federation(leaves=2)
    waiter = open_session(_waiting_leaf(server, federation.leaves[0], transport))
    other = open_session(credentials_for(server, federation.leaves[1], transport))
    receipt = upload_weights(waiter, update_file(1), 1, 1)
    waiter.client.listen()
    since = len(logs.records)
    _upload_later(other, update_file(2), WAIT_S)
    aggregation_id = wait_for_aggregation(waiter, 1, 1, timeout_s=120, run_check_interval_s=WAIT_S / 2,
                                          counted_in=receipt.counted_in)
    assert aggregation_id == server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    assert waiter.client.listen().connections == 1, "the connection lived on its keepalives"
    lines = _bk_lines(logs.records, since)
    assert len(lines) <= 2, f"a wait of {WAIT_S / KEEPALIVE_S:.0f} keepalives logged: {lines}"


def test_silently_dropped_connection_mid_wait_reconnects_catches_up_and_logs_once(
        pinging_server: tuple[str, BkServer], update_file: Callable[..., Path],
        open_session: Callable[..., LeafSession], logs: pytest.LogCaptureFixture) -> None:
    transport, server = pinging_server
    relay = TcpRelay(5672 if transport == "amqp" else server.port)
    try:
        federation = server.federation(leaves=2)
        waiter = open_session(_waiting_leaf(server, federation.leaves[0], transport, relay))
        other = open_session(credentials_for(server, federation.leaves[1], transport))
        receipt = upload_weights(waiter, update_file(1), 1, 1)
        listener = waiter.client.listen()
        since = len(logs.records)
        assert relay.sever(b"" if transport == "amqp" else WEBSOCKET_UPGRADE) == 1
        other.client.upload(update_file(2))
        aggregated = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        found = wait_for_aggregation(waiter, 1, 1, timeout_s=120, run_check_interval_s=600,
                                     counted_in=receipt.counted_in)
    finally:
        relay.close()
    assert found == aggregated, "the notice sent into the dead connection was caught up"
    assert listener.connections == 2
    warnings = [r.getMessage() for r in logs.records[since:]
                if r.name.startswith("prefect_branchkey") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "interrupted" in warnings[0], warnings
    assert not [r for r in logs.records[since:] if r.levelno >= logging.ERROR or r.exc_info], \
        "no error and no traceback for a connection the listener reconnects"
