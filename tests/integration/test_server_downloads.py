"""Downloads (two steps, pre-signed URLs), metrics and branch config."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from ..support.bkserver import BkServer, Federation
from ..support.wire import download_url, file_id_of, headers, send_metrics, upload


def aggregated(server: BkServer, federation: Federation, update_file: Callable[..., Path]) -> str:
    for leaf in federation.leaves:
        file_id_of(upload(server, leaf, update_file()))
    return server.wait_for_round(federation.branch_id, 1)["aggregation_id"]


@pytest.fixture
def federation(server: BkServer) -> Federation:
    return server.federation(leaves=2)


def test_download_url_works_without_any_auth_header(server: BkServer, federation: Federation,
                                                    update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    url = download_url(server, federation.leaves[0], aggregation_id).json()["data"]["download_url"]
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    assert response.content[:4] == b"PK\x03\x04"


def test_download_url_with_tampered_signature_is_403(server: BkServer, federation: Federation,
                                                     update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    url = download_url(server, federation.leaves[0], aggregation_id).json()["data"]["download_url"]
    response = requests.get(url[:-3] + "AAA", timeout=30)
    assert response.status_code == 403
    assert "signature" in response.json()["error"]


def test_download_url_for_another_branch_is_refused(server: BkServer, federation: Federation,
                                                    update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    url = download_url(server, federation.leaves[0], aggregation_id).json()["data"]["download_url"]
    other = server.federation(leaves=1).branch_id
    response = requests.get(url.replace(federation.branch_id, other), timeout=30)
    assert response.status_code == 403


def test_expired_download_url_is_refused(make_server: Callable[..., BkServer],
                                         update_file: Callable[..., Path]) -> None:
    server = make_server(download_url_ttl=1)
    federation = server.federation(leaves=1)
    aggregation_id = aggregated(server, federation, update_file)
    url = download_url(server, federation.leaves[0], aggregation_id).json()["data"]["download_url"]
    time.sleep(2.1)
    response = requests.get(url, timeout=30)
    assert response.status_code == 403
    assert "expired" in response.json()["error"]


def test_aggregate_of_another_branch_is_403(server: BkServer, federation: Federation,
                                            update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    stranger = server.federation(leaves=1).leaves[0]
    assert download_url(server, stranger, aggregation_id).status_code == 403


def test_unknown_aggregate_is_404(server: BkServer, federation: Federation) -> None:
    response = download_url(server, federation.leaves[0], "3f1c2d0e-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert "no aggregate" in response.json()["error"]


def test_metrics_sent_without_content_type_are_stored(server: BkServer, federation: Federation,
                                                      update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    response = send_metrics(server, federation.leaves[0], aggregation_id, {"accuracy": 0.91}, mode="test")
    assert response.status_code == 201
    assert "Content-Type" not in response.request.headers
    stored = server.status(federation.branch_id)["metrics"]
    assert stored == [{"leaf_id": federation.leaves[0]["id"], "aggregation_id": aggregation_id, "mode": "test",
                       "data": {"accuracy": 0.91}, "created_at": stored[0]["created_at"]}]


def test_metrics_naming_another_leaf_are_403(server: BkServer, federation: Federation,
                                             update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    response = send_metrics(server, federation.leaves[0], aggregation_id, {"a": 1}, leaf_id=federation.leaves[1]["id"])
    assert response.status_code == 403


def test_metrics_with_unknown_mode_are_400(server: BkServer, federation: Federation,
                                           update_file: Callable[..., Path]) -> None:
    aggregation_id = aggregated(server, federation, update_file)
    response = send_metrics(server, federation.leaves[0], aggregation_id, {"a": 1}, mode="validation")
    assert response.status_code == 400
    assert "mode must be one of" in response.json()["error"]


def test_metrics_for_unknown_aggregation_are_404(server: BkServer, federation: Federation) -> None:
    response = send_metrics(server, federation.leaves[0], "nope", {"a": 1})
    assert response.status_code == 404


def test_non_federated_metrics_need_no_aggregation(server: BkServer, federation: Federation) -> None:
    response = send_metrics(server, federation.leaves[0], "local-baseline", {"a": 1}, mode="non-federated")
    assert response.status_code == 201


def test_metrics_data_must_be_a_json_string(server: BkServer, federation: Federation) -> None:
    response = send_metrics(server, federation.leaves[0], "x", {}, mode="non-federated", data="{not json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_branch_config_has_the_documented_sections(server: BkServer, federation: Federation) -> None:
    leaf = federation.leaves[0]
    response = requests.get(f"{server.url}/api/v1/config/branch/{leaf['branch_id']}", headers=headers(leaf), timeout=10)
    data = response.json()["data"]
    assert set(data) == {"branch", "service", "model_config", "created_at", "updated_at"}
    assert data["branch"]["min_updates"] == 2
