"""A site behind TLS and an egress proxy, as a hospital's edge box meets the platform.

bk-server serves HTTPS with a certificate from a throwaway CA made in the test. The leaf knows
the platform as `platform.invalid`, a name that resolves nowhere but at the test's CONNECT proxy
(`tests/support/connect_proxy.py`): every connection that reached the platform went through the
proxy, which also counts the tunnels. The Block gets the CA (a path, or its PEM text) and
`proxy_url`. AMQP over TLS: a TLS-terminating relay with the same certificate sits in front of
the shared plain broker on 5672 (`tests/support/tls_relay.py`), which is neither reconfigured
nor restarted, so pika makes a real TLS handshake against the throwaway CA, inside the tunnel.

A wrong CA fails at once with one line naming the certificate problem, on either transport: a
handshake per connection the round opens before it fails (at most three), never a retry storm;
the notification listener stops after one attempt and the wait fails at once, as for a refused
token.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_branchkey.bk_blocks import BranchKeyCredentials, CertificateError, ProxyRefusedError
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.round import federated_round
from prefect_branchkey.flows.training import federated_training

from ..support.bkserver import BkServer
from ..support.connect_proxy import ConnectProxy
from ..support.pki import ServerPki, other_ca_file, server_pki
from ..support.tls_relay import TlsRelay

pytestmark = pytest.mark.e2e

PLATFORM = "platform.invalid"
DIGITS = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
ONE_LEAF = {"leaf_index": 0, "leaves": 1}
NOTICES = "prefect_branchkey.bk_blocks.notifications"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerPki:
    """A throwaway CA and the server certificate it signed for the platform's name and loopback."""
    return server_pki(tmp_path_factory.mktemp("pki"), [PLATFORM, "localhost"], ["127.0.0.1"])


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return other_ca_file(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    """The site's egress proxy: the only place `platform.invalid` resolves (to 127.0.0.1)."""
    proxy = ConnectProxy({PLATFORM: "127.0.0.1"})
    yield proxy
    proxy.close()


@pytest.fixture
def start_tls_server(pki: ServerPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start bk-server processes serving HTTPS with the throwaway certificate; stopped after the test."""
    started: list[BkServer] = []

    def start(amqp: bool = False) -> BkServer:
        server = BkServer(tmp_path_factory.mktemp("bk") / "data", amqp=amqp,
                          options={"ssl_certfile": pki.certfile, "ssl_keyfile": pki.keyfile})
        server.ca_file = pki.ca_file
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
        if server.amqp:
            server.cleanup_broker()


@pytest.fixture
def relay(rabbitmq: None, pki: ServerPki) -> Iterator[TlsRelay]:
    """AMQPS with the throwaway certificate in front of the shared plain broker on 5672."""
    relay = TlsRelay(5672, pki.certfile, pki.keyfile)
    yield relay
    relay.close()


def block_for(server: BkServer, leaf: dict[str, str], proxy: ConnectProxy, ca_bundle: str,
              **settings: Any) -> BranchKeyCredentials:
    """The Block of a leaf that knows the platform only by name, through the proxy, with a CA bundle."""
    return BranchKeyCredentials.from_platform_json(
        leaf, host=f"https://{PLATFORM}:{server.port}", ca_bundle=ca_bundle, proxy_url=proxy.url,
        connect_timeout_s=5, read_timeout_s=60, **settings)


def test_the_platform_name_resolves_only_at_the_proxy() -> None:
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(PLATFORM, 443)


def test_a_leaf_completes_rounds_over_websocket_through_the_proxy_with_the_ca_file(
        start_tls_server: Any, proxy: ConnectProxy, pki: ServerPki, tmp_path: Path, prefect_api: str,
        caplog: pytest.LogCaptureFixture) -> None:
    server = start_tls_server()
    federation = server.federation(leaves=1)
    block = block_for(server, federation.leaves[0], proxy, str(pki.ca_file), notification_transport="websocket")
    with caplog.at_level(logging.INFO, logger=NOTICES):
        results = federated_training(block, DIGITS, str(tmp_path / "leaf"), rounds=2, participant_options=ONE_LEAF,
                                     aggregation_timeout_s=120)
    assert [r.status for r in results] == ["completed", "completed"]
    assert [r["status"] for r in server.status(federation.branch_id)["rounds"][:2]] == ["aggregated"] * 2
    assert [r["round"] for r in history_rows(tmp_path / "leaf")] == [1, 2]
    announced = [r.getMessage() for r in caplog.records if "announced over websocket" in r.getMessage()]
    assert len(announced) == 2, "both aggregations arrived as WebSocket notices, not from run details"
    assert proxy.count(server.port) >= 3, "API calls, the WebSocket ticket and the WebSocket itself"
    assert proxy.refused == [] and {host for host, _ in proxy.tunnels} == {PLATFORM}


def test_a_leaf_completes_rounds_over_amqps_through_the_proxy_with_the_ca_as_pem_text(
        start_tls_server: Any, proxy: ConnectProxy, relay: TlsRelay, pki: ServerPki, tmp_path: Path,
        prefect_api: str, caplog: pytest.LogCaptureFixture) -> None:
    server = start_tls_server(amqp=True)
    federation = server.federation(leaves=1)
    block = block_for(server, federation.leaves[0], proxy, pki.ca_pem, notification_transport="amqp",
                      amqp_host=PLATFORM, amqp_port=relay.port, amqp_tls=True)
    with caplog.at_level(logging.INFO, logger=NOTICES):
        results = federated_training(block, DIGITS, str(tmp_path / "leaf"), rounds=2, participant_options=ONE_LEAF,
                                     aggregation_timeout_s=120)
    assert [r.status for r in results] == ["completed", "completed"]
    announced = [r.getMessage() for r in caplog.records if "announced over amqp" in r.getMessage()]
    assert len(announced) == 2, "both aggregations arrived over AMQP"
    assert proxy.count(relay.port) >= 1 and relay.handshakes == proxy.count(relay.port), \
        "every AMQP connection was a TLS handshake inside a tunnel of the proxy"
    assert proxy.count(server.port) >= 1 and proxy.refused == [], "HTTP too (one pooled connection may carry it all)"


def test_a_wrong_ca_fails_the_flow_at_once_with_one_line(start_tls_server: Any, proxy: ConnectProxy,
                                                          wrong_ca: Path, tmp_path: Path, prefect_api: str) -> None:
    server = start_tls_server()
    leaf = server.federation(leaves=1).leaves[0]
    block = block_for(server, leaf, proxy, str(wrong_ca), notification_transport="websocket")
    started = time.monotonic()
    with pytest.raises(CertificateError) as error:
        federated_round(block, DIGITS, str(tmp_path / "leaf"), participant_options=ONE_LEAF)
    elapsed = time.monotonic() - started
    message = str(error.value)
    assert message.startswith(f"TLS certificate of https://{PLATFORM}:{server.port} not trusted: ")
    assert "unable to get local issuer certificate" in message and "ca_bundle" in message and "\n" not in message
    assert elapsed < 20, f"failed after {elapsed:.1f} s: no retries"
    tunnels = proxy.count(server.port)
    time.sleep(2)
    assert proxy.count(server.port) == tunnels <= 3, (
        "one handshake each for the branch's name (a label: logged, not fatal), the WebSocket ticket (the "
        "listener stops) and the run's details (the round fails), then nothing more")
    assert server.status(leaf["branch_id"])["rounds"][0]["updates"] == 0


def test_a_wrong_ca_stops_the_amqp_listener_at_once(start_tls_server: Any, proxy: ConnectProxy, relay: TlsRelay,
                                                     pki: ServerPki, wrong_ca: Path) -> None:
    server = start_tls_server(amqp=True)
    leaf = server.federation(leaves=1).leaves[0]
    block = block_for(server, leaf, proxy, str(wrong_ca), notification_transport="amqp", amqp_host=PLATFORM,
                      amqp_port=relay.port, amqp_tls=True)
    started = time.monotonic()
    with block.get_client() as client, pytest.raises(CertificateError, match=(
            rf"^TLS certificate of amqps://{PLATFORM}:{relay.port} not trusted: unable to get local issuer "
            r"certificate; the Block's ca_bundle did not sign it")):
        client.listen()
        client.wait_for_aggregation(600)
    assert time.monotonic() - started < 5, "the wait fails at once, as for a refused token"
    time.sleep(2)
    assert proxy.count(relay.port) == 1 and relay.handshakes == 0, "one attempt, no reconnects"


def test_a_bundle_of_several_cas_as_pem_text_serves_http_and_amqp(
        start_tls_server: Any, proxy: ConnectProxy, relay: TlsRelay, wrong_ca: Path, pki: ServerPki) -> None:
    server = start_tls_server(amqp=True)
    leaf = server.federation(leaves=1).leaves[0]
    bundle = wrong_ca.read_text() + pki.ca_pem
    block = block_for(server, leaf, proxy, bundle, notification_transport="amqp", amqp_host=PLATFORM,
                      amqp_port=relay.port, amqp_tls=True)
    with block.get_client() as client:
        assert client.run_details().run_status == "start"
        assert client.listen().connected


def test_a_proxy_that_refuses_the_tunnel_fails_at_once(start_tls_server: Any, proxy: ConnectProxy,
                                                        pki: ServerPki) -> None:
    server = start_tls_server()
    leaf = server.federation(leaves=1).leaves[0]
    block = BranchKeyCredentials.from_platform_json(
        leaf, host=f"https://elsewhere.invalid:{server.port}", ca_bundle=str(pki.ca_file), proxy_url=proxy.url)
    with block.get_client() as client, pytest.raises(ProxyRefusedError, match=(
            rf"^proxy {proxy.url} refused the tunnel to elsewhere.invalid:{server.port}: 403 Forbidden; "
            "its policy must allow CONNECT there$")):
        client.run_details()
    assert len(proxy.refused) == 1 and proxy.tunnels == []


@pytest.mark.parametrize("transport", ["websocket", "amqp"])
def test_a_proxy_that_refuses_the_notification_tunnel_stops_the_listener_at_once(
        proxy: ConnectProxy, pki: ServerPki, transport: str) -> None:
    leaf = {"id": "leaf-uuid", "name": "hospital-a", "session_token": "s3cret-token-value", "tree_id": "tree-uuid",
            "branch_id": "branch-uuid", "owner_id": "owner-uuid"}
    block = BranchKeyCredentials.from_platform_json(
        leaf, host="https://elsewhere.invalid", ca_bundle=str(pki.ca_file), proxy_url=proxy.url,
        notification_transport=transport, amqp_port=5671, amqp_tls=True)
    target = "elsewhere.invalid:5671" if transport == "amqp" else "elsewhere.invalid"
    started = time.monotonic()
    with block.get_client() as client, pytest.raises(ProxyRefusedError, match=(
            rf"^proxy {proxy.url} refused the tunnel to {target}: 403 Forbidden; its policy must allow CONNECT")):
        client.listen()
        client.wait_for_aggregation(600)
    assert time.monotonic() - started < 5
    time.sleep(1)
    assert len(proxy.refused) == 1, "one attempt, no reconnects"


def test_a_block_saved_before_ca_bundle_and_proxy_url_existed_still_loads(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    leaf = {"id": "leaf-uuid", "name": "old-leaf", "session_token": "s3cret-token-value", "tree_id": "tree-uuid",
            "branch_id": "branch-uuid", "owner_id": "owner-uuid"}
    BranchKeyCredentials.from_platform_json(leaf, proxies={"https": "http://proxy:8080"}).save(
        "saved-before-tls-fields", overwrite=True)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name("saved-before-tls-fields", "branchkey-credentials",
                                                      include_secrets=True)
        old = {key: value for key, value in document.data.items() if key not in ("ca_bundle", "proxy_url")}
        client.update_block_document(document.id, BlockDocumentUpdate(data=old, merge_existing_data=False))
        assert "proxy_url" not in client.read_block_document_by_name(
            "saved-before-tls-fields", "branchkey-credentials").data
    loaded = BranchKeyCredentials.load("saved-before-tls-fields")
    assert loaded.ca_bundle is None and loaded.proxy_url is None
    assert loaded.proxies == {"https": "http://proxy:8080"}
    assert loaded.session_token.get_secret_value() == "s3cret-token-value"
