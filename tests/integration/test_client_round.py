"""A federation driven only through BranchKeyCredentials + BranchKeyClient, over each transport."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from prefect_branchkey.bk_blocks import BranchKeyClient
from prefect_branchkey.bk_blocks.archive import read_aggregate, read_update

from ..support.bkserver import BkServer, credentials_for
from ..support.reference import fedavg_reference


def test_three_leaf_round_with_block_and_client(transport_server: tuple[str, BkServer],
                                                update_file: Callable[..., Path], tmp_path: Path) -> None:
    transport, server = transport_server
    federation = server.federation(leaves=3)
    clients = [credentials_for(server, leaf, transport).get_client() for leaf in federation.leaves]
    paths = [update_file(seed, weighting=100.0 * (seed + 1)) for seed in range(3)]
    try:
        marks = [client.mark() for client in clients]
        assert all(client.run_details().run_status == "start" for client in clients)
        file_ids = [client.upload(path) for client, path in zip(clients, paths, strict=True)]
        assert len(set(file_ids)) == 3
        notices = [client.wait_for_aggregation(30, after=mark) for client, mark in zip(clients, marks, strict=True)]
        assert len({n.aggregation_id for n in notices}) == 1
        result = read_aggregate(clients[0].download(notices[0].aggregation_id, tmp_path / "agg"))
        for got, want in zip(result, fedavg_reference([read_update(p) for p in paths]), strict=False):
            np.testing.assert_allclose(got.astype(float), want.astype(float), rtol=1e-3)
        for client in clients:
            client.send_metrics(notices[0].aggregation_id, {"accuracy": 0.5}, mode="test")
        assert len(server.status(federation.branch_id)["metrics"]) == 3
    finally:
        for client in clients:
            client.close()


def test_leaves_uploading_concurrently_all_get_the_aggregate(transport_server: tuple[str, BkServer],
                                                             update_file: Callable[..., Path]) -> None:
    transport, server = transport_server
    federation = server.federation(leaves=3)
    results: dict[int, str] = {}

    def leaf(index: int, client: BranchKeyClient) -> None:
        with client:
            mark = client.mark()
            client.upload(update_file(index))
            results[index] = client.wait_for_aggregation(30, after=mark).aggregation_id

    threads = [threading.Thread(target=leaf, args=(i, credentials_for(server, creds, transport).get_client()))
               for i, creds in enumerate(federation.leaves)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3 and len(set(results.values())) == 1


def test_run_status_is_kept_current_from_notices(transport_server: tuple[str, BkServer]) -> None:
    transport, server = transport_server
    federation = server.federation(leaves=1)
    with credentials_for(server, federation.leaves[0], transport).get_client() as client:
        listener = client.listen()
        server.run(federation.branch_id, "pause")
        deadline = threading.Event()
        for _ in range(100):
            if client.run_status == "pause":
                break
            deadline.wait(0.05)
        assert client.run_status == "pause"
        assert listener.connected
