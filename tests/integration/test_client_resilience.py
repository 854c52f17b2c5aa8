"""What the client does when things go wrong: retries, lost connections, stale notices, broker restarts."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from prefect_branchkey.bk_blocks import TransientError

from ..support.bkserver import RABBIT_ADMIN, BkServer, credentials_for
from ..support.faulty_proxy import FaultyProxy


@pytest.fixture
def proxy(server: BkServer) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(server.url)
    yield proxy
    proxy.close()


def test_retried_upload_with_same_idempotency_key_counts_once(server: BkServer, proxy: FaultyProxy,
                                                              update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    path = update_file()
    with credentials_for(server, federation.leaves[0], host=proxy.url).get_client() as client:
        first = client.upload(path, idempotency_key="leaf1-r1-digest")
        second = client.upload(path, idempotency_key="leaf1-r1-digest")
    assert first == second
    assert server.status(federation.branch_id)["rounds"][0]["updates"] == 1


def test_upload_sends_the_3x_integrity_headers_and_json_metadata(server: BkServer, proxy: FaultyProxy,
                                                                 update_file: Callable[..., Path]) -> None:
    leaf = server.federation(leaves=2).leaves[0]
    with credentials_for(server, leaf, host=proxy.url).get_client() as client:
        client.upload(update_file())
    headers = {k.lower(): v for k, v in proxy.headers_seen[-1].items()}
    assert headers["leaf"] == "true"
    assert headers["x-bk-file-digest"].startswith("sha256=")
    assert int(headers["x-bk-file-size"]) > 0
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert "transfer-encoding" not in headers, "the body has a Content-Length, not chunked encoding"


def test_truncated_download_leaves_no_partial_file(server: BkServer, proxy: FaultyProxy,
                                                   update_file: Callable[..., Path], tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    with credentials_for(server, federation.leaves[0], host=proxy.url).get_client() as client:
        client.upload(update_file())
        aggregation_id = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        proxy.inject("truncate", "/api/v1/files/")
        with pytest.raises(TransientError, match="download"):
            client.download(aggregation_id, tmp_path / "out")
        assert list((tmp_path / "out").iterdir()) == []
        assert client.download(aggregation_id, tmp_path / "out").exists()


def test_stale_notice_from_a_skipped_round_is_not_returned(transport_server: tuple[str, BkServer],
                                                          update_file: Callable[..., Path]) -> None:
    transport, server = transport_server
    federation = server.federation(leaves=2, min_updates=1)
    skipper, worker = (credentials_for(server, leaf, transport).get_client() for leaf in federation.leaves)
    with skipper, worker:
        skipper.listen()
        worker.upload(update_file(1))
        round_one = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        time.sleep(0.5)
        mark = skipper.mark()
        skipper.upload(update_file(2))
        notice = skipper.wait_for_aggregation(30, after=mark)
    assert notice.aggregation_id != round_one
    assert notice.aggregation_id == server.wait_for_round(federation.branch_id, 2)["aggregation_id"]


def test_notice_published_while_disconnected_is_received(amqp_server: BkServer,
                                                         update_file: Callable[..., Path]) -> None:
    federation = amqp_server.federation(leaves=1)
    credentials = credentials_for(amqp_server, federation.leaves[0], "amqp")
    with credentials.get_client() as client:
        client.upload(update_file())
    expected = amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    with credentials.get_client() as client:
        assert client.wait_for_aggregation(30).aggregation_id == expected


def test_notice_not_handed_over_is_redelivered_to_the_next_client(amqp_server: BkServer,
                                                                 update_file: Callable[..., Path]) -> None:
    federation = amqp_server.federation(leaves=1)
    credentials = credentials_for(amqp_server, federation.leaves[0], "amqp")
    with credentials.get_client() as client:
        client.listen()
        client.upload(update_file())
        expected = amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
        time.sleep(0.5)
    with credentials.get_client() as client:
        assert client.wait_for_aggregation(30).aggregation_id == expected


@pytest.mark.exclusive
def test_broker_restart_while_waiting(amqp_server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = amqp_server.federation(leaves=2)
    waiter, other = (credentials_for(amqp_server, leaf, "amqp").get_client() for leaf in federation.leaves)
    with waiter, other:
        mark = waiter.mark()
        waiter.upload(update_file(1))
        result: dict[str, str] = {}
        thread = threading.Thread(target=lambda: result.update(
            id=waiter.wait_for_aggregation(90, after=mark).aggregation_id))
        thread.start()
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=60)
        _wait_for_broker()
        other.upload(update_file(2))
        thread.join(90)
    assert result["id"] == amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]


def _wait_for_broker() -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{RABBIT_ADMIN}/api/overview", auth=("guest", "guest"), timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("broker did not come back")


def test_session_token_never_appears_in_logs_reprs_or_errors(
    transport_server: tuple[str, BkServer], update_file: Callable[..., Path], caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    transport, server = transport_server
    federation = server.federation(leaves=1)
    leaf = federation.leaves[0]
    token = leaf["session_token"]
    credentials = credentials_for(server, leaf, transport)
    texts = [repr(credentials), str(credentials), json.dumps(credentials.model_dump(mode="json"))]
    with caplog.at_level(logging.DEBUG), credentials.get_client() as client:
        texts.append(repr(client))
        mark = client.mark()
        client.upload(update_file())
        notice = client.wait_for_aggregation(30, after=mark)
        client.download(notice.aggregation_id, tmp_path)
        client.send_metrics(notice.aggregation_id, {"accuracy": 1.0})
        for failing in (lambda: client.download("nope", tmp_path), lambda: client.upload(tmp_path / "missing.npz")):
            with pytest.raises(Exception) as error:
                failing()
            texts.append(str(error.value))
    bad = credentials_for(server, leaf | {"session_token": token[::-1]}, transport)
    with bad.get_client() as client, pytest.raises(Exception) as error:
        client.run_details()
    texts.append(str(error.value))
    assert caplog.records, "the client logs what it does"
    assert token not in caplog.text and token[::-1] not in caplog.text
    assert not [text for text in texts if token in text or token[::-1] in text]


def test_malformed_notice_does_not_block_later_ones(amqp_server: BkServer, update_file: Callable[..., Path]) -> None:
    import pika

    federation = amqp_server.federation(leaves=1)
    params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:5672/{federation.tree_id}")
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        for body in (b'{"message_type": "run_status", "body": "x"}', b"not json", b'{"message_type": "other"}'):
            channel.basic_publish(exchange=federation.branch_id, routing_key="", body=body)
    with credentials_for(amqp_server, federation.leaves[0], "amqp").get_client() as client:
        mark = client.mark()
        client.upload(update_file())
        notice = client.wait_for_aggregation(30, after=mark)
    assert notice.aggregation_id == amqp_server.wait_for_round(federation.branch_id, 1)["aggregation_id"]


def test_notice_taken_without_ack_comes_back_after_a_crash(amqp_server: BkServer,
                                                           update_file: Callable[..., Path]) -> None:
    federation = amqp_server.federation(leaves=1)
    credentials = credentials_for(amqp_server, federation.leaves[0], "amqp")
    with credentials.get_client() as client:
        mark = client.mark()
        client.upload(update_file())
        taken = client.wait_for_aggregation(30, after=mark, auto_ack=False).aggregation_id
    with credentials.get_client() as client:
        assert client.wait_for_aggregation(30, auto_ack=False).aggregation_id == taken
        client.acknowledge(taken)
    with credentials.get_client() as client, pytest.raises(TransientError):
        client.wait_for_aggregation(2)
