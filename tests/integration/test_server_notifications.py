"""Notifications over WebSocket (tickets, pings) and over RabbitMQ (vhosts, users, durable queues)."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pika.exceptions
import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from ..support.bkserver import BkServer
from ..support.wire import AmqpListener, WsListener, file_id_of, headers, upload


def ticket(server: BkServer, leaf: dict[str, str]) -> dict[str, str]:
    response = requests.post(f"{server.url}/api/v1/ws/ticket", headers=headers(leaf), timeout=10)
    assert response.status_code == 200
    return response.json()["data"]


def ws_url(server: BkServer, data: dict[str, str]) -> str:
    return f"ws://127.0.0.1:{server.port}/api/v1/ws?ticket={data['ticket_id']}&request_id={data['request_id']}"


def test_ticket_has_id_request_id_and_expiry(server: BkServer) -> None:
    data = ticket(server, server.federation(leaves=1).leaves[0])
    assert set(data) == {"ticket_id", "request_id", "expires_at"}


def test_ticket_works_only_once(server: BkServer) -> None:
    data = ticket(server, server.federation(leaves=1).leaves[0])
    with ws_connect(ws_url(server, data)):
        pass
    with pytest.raises(InvalidStatus):
        ws_connect(ws_url(server, data))


def test_expired_ticket_is_refused(make_server: Callable[..., BkServer]) -> None:
    server = make_server(ws_ticket_ttl=0.5)
    data = ticket(server, server.federation(leaves=1).leaves[0])
    time.sleep(1)
    with pytest.raises(InvalidStatus):
        ws_connect(ws_url(server, data))


def test_ticket_needs_a_leaf_token(server: BkServer) -> None:
    assert requests.post(f"{server.url}/api/v1/ws/ticket", timeout=10).status_code == 401


def test_server_pings_websocket_clients(make_server: Callable[..., BkServer]) -> None:
    server = make_server(ws_ping_interval=0.5)
    data = ticket(server, server.federation(leaves=1).leaves[0])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        path = ws_url(server, data).split(str(server.port), 1)[1]
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1024)
        assert response.startswith(b"HTTP/1.1 101")
        first_frame = response.split(b"\r\n\r\n", 1)[1] or sock.recv(2)
        assert first_frame[0] & 0x0F == 0x9, "the first frame from the server is a ping"


def test_three_leaf_round_over_websocket(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    listeners = [WsListener(server, leaf) for leaf in federation.leaves]
    try:
        for leaf in federation.leaves:
            file_id_of(upload(server, leaf, update_file()))
        expected = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        assert [listener.next("aggregation_status")["aggregation_id"] for listener in listeners] == [expected] * 3
    finally:
        for listener in listeners:
            listener.close()


def test_three_leaf_round_over_amqp(amqp_server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = amqp_server.federation(leaves=3)
    listeners = [AmqpListener(leaf) for leaf in federation.leaves]
    try:
        for listener in listeners:
            assert listener.next("run_status")["run_status"] == "start"
        for leaf in federation.leaves:
            file_id_of(upload(amqp_server, leaf, update_file()))
        expected = amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        assert [listener.next("aggregation_status")["aggregation_id"] for listener in listeners] == [expected] * 3
    finally:
        for listener in listeners:
            listener.close()


def test_amqp_notice_waits_in_the_durable_queue_for_an_offline_leaf(
    amqp_server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = amqp_server.federation(leaves=1)
    file_id_of(upload(amqp_server, federation.leaves[0], update_file()))
    expected = amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    amqp_server.restart(hard=True)
    listener = AmqpListener(federation.leaves[0])
    try:
        assert listener.next("aggregation_status")["aggregation_id"] == expected
    finally:
        listener.close()


def test_amqp_run_status_is_published(amqp_server: BkServer) -> None:
    federation = amqp_server.federation(leaves=1)
    amqp_server.run(federation.branch_id, "pause")
    listener = AmqpListener(federation.leaves[0])
    try:
        assert listener.next("run_status")["run_status"] == "start"
        assert listener.next("run_status")["run_status"] == "pause"
    finally:
        listener.close()


def test_leaf_user_cannot_declare_on_the_broker(amqp_server: BkServer) -> None:
    listener = AmqpListener(amqp_server.federation(leaves=1).leaves[0])
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            listener.channel.queue_declare("sneaky", durable=True)
        assert refused.value.reply_code == 403
    finally:
        listener.close()


def test_leaf_cannot_read_another_leafs_queue(amqp_server: BkServer) -> None:
    first, second = amqp_server.federation(leaves=2).leaves
    listener = AmqpListener(first)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            listener.channel.basic_get(second["id"])
        assert refused.value.reply_code == 403
    finally:
        listener.close()


def test_wrong_token_cannot_log_in_to_the_broker(amqp_server: BkServer) -> None:
    leaf = amqp_server.federation(leaves=1).leaves[0]
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        AmqpListener(leaf | {"session_token": "wrong"})
