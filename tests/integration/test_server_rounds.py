"""Rounds: closing at min_updates or at a deadline, FedAvg results, run control, restarts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import read_aggregate, read_update, write_update
from prefect_branchkey.bk_server.admin_client import AdminCallError

from ..support.bkserver import BkServer
from ..support.reference import fedavg_reference
from ..support.wire import WsListener, download, file_id_of, run_details, upload


def assert_layers_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=1e-3 if got.dtype == np.float16 else 1e-6)


def test_round_closes_at_min_updates_and_aggregate_matches_numpy(
    server: BkServer, update_file: Callable[..., Path], tmp_path: Path
) -> None:
    federation = server.federation(leaves=3)
    paths = [update_file(seed, weighting=w) for seed, w in zip(range(3), (40000.0, 60000.0, 5.0), strict=True)]
    for leaf, path in zip(federation.leaves, paths, strict=True):
        file_id_of(upload(server, leaf, path))
    aggregation_id = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    result = read_aggregate(download(server, federation.leaves[0], aggregation_id, tmp_path / "agg.npz"))
    assert_layers_equal(result, fedavg_reference([read_update(p) for p in paths]))


def test_round_stays_open_below_min_updates(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    for leaf in federation.leaves[:2]:
        file_id_of(upload(server, leaf, update_file()))
    time.sleep(0.5)
    assert [r["status"] for r in server.status(federation.branch_id)["rounds"]] == ["open"]


def test_replaced_upload_is_the_one_averaged(server: BkServer, update_file: Callable[..., Path],
                                             tmp_path: Path) -> None:
    federation = server.federation(leaves=2)
    file_id_of(upload(server, federation.leaves[0], update_file(1)))
    final = update_file(2)
    file_id_of(upload(server, federation.leaves[0], final))
    other = update_file(3)
    file_id_of(upload(server, federation.leaves[1], other))
    aggregation_id = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    result = read_aggregate(download(server, federation.leaves[1], aggregation_id, tmp_path / "agg.npz"))
    assert_layers_equal(result, fedavg_reference([read_update(final), read_update(other)]))


def test_next_round_opens_after_aggregation(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    for leaf in federation.leaves:
        file_id_of(upload(server, leaf, update_file()))
    server.wait_for_round(federation.branch_id, 1)
    for leaf in federation.leaves:
        file_id_of(upload(server, leaf, update_file(5)))
    assert server.wait_for_round(federation.branch_id, 2)["updates"] == 2


def test_later_round_refuses_a_different_model(server: BkServer, update_file: Callable[..., Path],
                                               model: Callable[[int], list[np.ndarray]]) -> None:
    federation = server.federation(leaves=1)
    file_id_of(upload(server, federation.leaves[0], update_file()))
    server.wait_for_round(federation.branch_id, 1)
    response = upload(server, federation.leaves[0], update_file(layers=model(0)[:3]))
    assert response.status_code == 422


def test_deadline_closes_round_once_quorum_arrived(make_server: Callable[..., BkServer],
                                                   update_file: Callable[..., Path]) -> None:
    server = make_server()
    federation = server.federation(leaves=3, min_updates=3, quorum=2, round_deadline_s=1.5)
    for leaf in federation.leaves[:2]:
        file_id_of(upload(server, leaf, update_file()))
    round_ = server.wait_for_round(federation.branch_id, 1, timeout=10)
    assert round_["updates"] == 2


def test_deadline_without_quorum_keeps_round_open(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3, min_updates=3, quorum=2, round_deadline_s=0.5)
    file_id_of(upload(server, federation.leaves[0], update_file()))
    time.sleep(2)
    assert server.status(federation.branch_id)["rounds"][0]["status"] == "open"


def test_upload_refused_while_run_paused(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    file_id_of(upload(server, federation.leaves[0], update_file()))
    server.run(federation.branch_id, "pause")
    response = upload(server, federation.leaves[1], update_file())
    assert response.status_code == 409
    assert "run is blocked" in response.json()["error"]
    assert server.status(federation.branch_id)["rounds"][0]["updates"] == 1


def test_resume_after_pause_keeps_the_round(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    file_id_of(upload(server, federation.leaves[0], update_file()))
    server.run(federation.branch_id, "pause")
    server.run(federation.branch_id, "start")
    file_id_of(upload(server, federation.leaves[1], update_file()))
    assert server.wait_for_round(federation.branch_id, 1)["updates"] == 2
    assert run_details(server, federation.leaves[0]).json()["data"]["run_number"] == 1


def test_stop_then_start_begins_a_new_run(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    file_id_of(upload(server, federation.leaves[0], update_file()))
    server.run(federation.branch_id, "stop")
    assert upload(server, federation.leaves[1], update_file()).status_code == 409
    server.run(federation.branch_id, "start")
    assert run_details(server, federation.leaves[0]).json()["data"] == {
        "run_status": "start", "run_number": 2, "round": 1, "aggregating": [], "latest_aggregation": None,
        "latest_statistics": None}
    rounds = server.status(federation.branch_id)["rounds"]
    assert [(r["run_number"], r["status"], r["updates"]) for r in rounds] == [(1, "abandoned", 0), (2, "open", 0)]


def test_run_status_changes_reach_websocket_listeners(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    listener = WsListener(server, federation.leaves[0])
    try:
        server.run(federation.branch_id, "pause")
        assert listener.next("run_status")["run_status"] == "pause"
        server.run(federation.branch_id, "stop")
        assert listener.next("run_status")["run_status"] == "stop"
    finally:
        listener.close()


def test_uploads_accepted_before_a_restart_still_count(
    make_server: Callable[..., BkServer], update_file: Callable[..., Path], tmp_path: Path
) -> None:
    server = make_server()
    federation = server.federation(leaves=3)
    paths = [update_file(seed, weighting=10.0 * (seed + 1)) for seed in range(3)]
    for leaf, path in zip(federation.leaves[:2], paths[:2], strict=True):
        file_id_of(upload(server, leaf, path))
    server.restart(hard=True)
    file_id_of(upload(server, federation.leaves[2], paths[2]))
    aggregation_id = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    result = read_aggregate(download(server, federation.leaves[0], aggregation_id, tmp_path / "agg.npz"))
    assert_layers_equal(result, fedavg_reference([read_update(p) for p in paths]))


def test_idempotency_survives_a_restart(make_server: Callable[..., BkServer],
                                       update_file: Callable[..., Path]) -> None:
    server = make_server()
    federation = server.federation(leaves=2)
    path = update_file()
    first = file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"}))
    server.restart(hard=True)
    again = file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"}))
    assert first == again
    assert server.status(federation.branch_id)["rounds"][0]["updates"] == 1


def test_api_answers_while_a_round_aggregates(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=3)
    big = [write_update(tmp_path / f"big{i}.npz", 1.0 + i, [np.full(50_000_000, i, np.float32)]) for i in range(3)]
    for leaf, path in zip(federation.leaves, big, strict=True):
        file_id_of(upload(server, leaf, path))
    answered_during_aggregation = False
    while True:
        assert run_details(server, federation.leaves[0]).status_code == 200
        status = server.status(federation.branch_id)["rounds"][0]["status"]
        if status == "aggregated":
            break
        answered_during_aggregation |= status == "aggregating"
    assert answered_during_aggregation


def test_a_stopped_run_cannot_be_paused(server: BkServer) -> None:
    federation = server.federation(leaves=1)
    server.run(federation.branch_id, "stop")
    with pytest.raises(AdminCallError, match="cannot be paused"):
        server.run(federation.branch_id, "pause")


def test_idempotency_key_of_a_discarded_upload_counts_again_in_the_new_run(
    server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = server.federation(leaves=2)
    path = update_file()
    first = file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"}))
    server.run(federation.branch_id, "stop")
    server.run(federation.branch_id, "start")
    again = file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"}))
    assert again != first
    assert server.status(federation.branch_id)["rounds"][-1]["updates"] == 1


def test_retry_with_a_key_gets_its_file_id_even_while_paused(server: BkServer,
                                                             update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    path = update_file()
    first = file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"}))
    server.run(federation.branch_id, "pause")
    assert file_id_of(upload(server, federation.leaves[0], path, extra_headers={"Idempotency-Key": "k"})) == first
