"""Every typed error of BranchKeyClient, and what a retry-worthy failure looks like."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks import (
    ArchiveRejectedError,
    AuthenticationError,
    NotFoundError,
    NotificationTimeout,
    RunNotStartedError,
    TransientError,
    UnsafeFileIdError,
)
from prefect_branchkey.bk_blocks.credentials import BranchKeyCredentials

from ..support.bkserver import BkServer, credentials_for, free_port
from ..support.faulty_proxy import FaultyProxy


@pytest.fixture
def proxy(server: BkServer) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(server.url)
    yield proxy
    proxy.close()


def test_wrong_token_raises_authentication_error(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    credentials = credentials_for(server, leaf | {"session_token": "wrong"})
    with credentials.get_client() as client, pytest.raises(AuthenticationError) as error:
        client.run_details()
    assert error.value.status_code == 401


def test_other_branch_raises_authentication_error(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    other = server.federation(leaves=1).branch_id
    with (credentials_for(server, leaf | {"branch_id": other}).get_client() as client,
          pytest.raises(AuthenticationError) as error):
        client.run_details()
    assert error.value.status_code == 403


def test_upload_while_paused_raises_run_not_started(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    server.run(federation.branch_id, "pause")
    with (credentials_for(server, federation.leaves[0]).get_client() as client,
          pytest.raises(RunNotStartedError, match="run is blocked")):
        client.upload(update_file())


def test_server_refusal_carries_its_message(server: BkServer, update_file: Callable[..., Path],
                                            model: Callable[[int], list[np.ndarray]]) -> None:
    federation = server.federation(leaves=3)
    first, second = (credentials_for(server, leaf).get_client() for leaf in federation.leaves[:2])
    with first, second:
        first.upload(update_file(0))
        with pytest.raises(ArchiveRejectedError, match=r"has 2 layers but this round's updates have 4"):
            second.upload(update_file(layers=model(1)[:2]))


def test_invalid_archive_is_refused_before_any_request(server: BkServer, tmp_path: Path, proxy: FaultyProxy) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    path = tmp_path / "nan.npz"
    np.savez(path, weighting=np.array([1.0]), layer_0=np.array([np.nan]))
    with (credentials_for(server, leaf, host=proxy.url).get_client() as client,
          pytest.raises(ArchiveRejectedError, match="NaN")):
        client.upload(path)
    assert proxy.count("POST", "/upload") == 0


def test_unknown_aggregate_raises_not_found(server: BkServer, tmp_path: Path) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    with credentials_for(server, leaf).get_client() as client, pytest.raises(NotFoundError):
        client.download("00000000-0000-4000-8000-000000000000", tmp_path)


@pytest.mark.parametrize("file_id", ["../etc/passwd", "a/b", "..", "x\\y", ""])
def test_unsafe_file_id_is_refused_without_a_request(server: BkServer, tmp_path: Path, file_id: str) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    with credentials_for(server, leaf).get_client() as client, pytest.raises(UnsafeFileIdError):
        client.download(file_id, tmp_path)


def test_unreachable_platform_is_transient(tmp_path: Path) -> None:
    credentials = BranchKeyCredentials(leaf_id="l", leaf_name="n", session_token="t", tree_id="t", branch_id="b",
                                       owner_id="o", host=f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    with credentials.get_client() as client, pytest.raises(TransientError, match="ConnectionError"):
        client.run_details()


def test_503_is_transient(server: BkServer, proxy: FaultyProxy) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    proxy.inject("503", "/api/v1/run/")
    with credentials_for(server, leaf, host=proxy.url).get_client() as client:
        with pytest.raises(TransientError, match="503"):
            client.run_details()
        assert client.run_details().run_status == "start"


def test_dropped_connection_is_transient(server: BkServer, proxy: FaultyProxy,
                                        update_file: Callable[..., Path]) -> None:
    leaf = server.federation(leaves=2).leaves[0]
    proxy.inject("drop", "/upload")
    with credentials_for(server, leaf, host=proxy.url).get_client() as client, pytest.raises(TransientError):
        client.upload(update_file())


def test_wait_without_notice_times_out_as_transient(server: BkServer) -> None:
    leaf = server.federation(leaves=2).leaves[0]
    with credentials_for(server, leaf).get_client() as client, pytest.raises(NotificationTimeout) as error:
        client.wait_for_aggregation(0.5, after=client.mark())
    assert isinstance(error.value, TransientError)


def test_metrics_that_are_not_json_are_refused_locally(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    with credentials_for(server, leaf).get_client() as client, pytest.raises(ValueError, match="finite"):
        client.send_metrics("x", {"loss": float("nan")}, mode="non-federated")
