"""What the platform tells a leaf so it can catch up (extra reply fields official clients ignore),
and what it refuses so no stale update is counted; nothing half-written survives a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..support.bkserver import BkServer, Federation
from ..support.wire import file_id_of, run_details, send_metrics, upload


def round_headers(run_number: int, round_number: int) -> dict[str, str]:
    return {"x-bk-run-number": str(run_number), "x-bk-round": str(round_number)}


def close_round(server: BkServer, federation: Federation, update_file: Callable[..., Path], round_number: int) -> str:
    for seed, leaf in enumerate(federation.leaves):
        file_id_of(upload(server, leaf, update_file(seed)))
    return server.wait_for_round(federation.branch_id, round_number)["aggregation_id"]


def test_run_details_name_the_open_round_and_the_latest_aggregation(
    server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = server.federation(leaves=2)
    aggregation_id = close_round(server, federation, update_file, 1)
    data = run_details(server, federation.leaves[0]).json()["data"]
    assert data == {"run_status": "start", "run_number": 1, "round": 2, "aggregating": [],
                    "latest_aggregation": {"aggregation_id": aggregation_id, "run_number": 1, "round": 1},
                    "latest_statistics": None}


def test_upload_reply_names_the_round_it_counts_in(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    data = upload(server, federation.leaves[0], update_file(0)).json()["data"]
    assert (data["run_number"], data["round"], data["aggregation_id"]) == (1, 1, None)


def test_upload_for_a_closed_round_is_refused_as_stale_and_the_open_round_is_untouched(
    server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = server.federation(leaves=2)
    close_round(server, federation, update_file, 1)
    response = upload(server, federation.leaves[0], update_file(5), extra_headers=round_headers(1, 1))
    assert response.status_code == 409
    assert response.json()["code"] == "stale_round"
    assert "platform is at run 1 round 2" in response.json()["error"]
    open_round = server.status(federation.branch_id)["rounds"][-1]
    assert (open_round["round"], open_round["updates"]) == (2, 0)


def test_upload_naming_the_open_round_is_accepted(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    response = upload(server, federation.leaves[0], update_file(0), extra_headers=round_headers(1, 1))
    assert response.status_code == 201, response.text


def test_replayed_upload_of_an_aggregated_round_gets_its_aggregation(
    server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = server.federation(leaves=2)
    paths = [update_file(seed) for seed in range(2)]
    key = {"Idempotency-Key": "leaf-0.run1.round1"}
    for leaf, path in zip(federation.leaves, paths, strict=True):
        upload(server, leaf, path, extra_headers=key | round_headers(1, 1))
    aggregation_id = server.wait_for_round(federation.branch_id, 1)["aggregation_id"]
    replay = upload(server, federation.leaves[0], paths[0], extra_headers=key | round_headers(1, 1))
    assert replay.status_code == 201, replay.text
    assert (replay.json()["data"]["round"], replay.json()["data"]["aggregation_id"]) == (1, aggregation_id)


def test_metrics_repeated_with_one_idempotency_key_are_stored_once(
    server: BkServer, update_file: Callable[..., Path]
) -> None:
    federation = server.federation(leaves=2)
    aggregation_id = close_round(server, federation, update_file, 1)
    for _ in range(3):
        response = send_metrics(server, federation.leaves[0], aggregation_id, {"accuracy": 0.9},
                                headers_extra={"Idempotency-Key": f"metrics.{aggregation_id}.test"})
        assert response.status_code == 201, response.text
    assert len(server.status(federation.branch_id)["metrics"]) == 1


def test_partial_files_of_an_interrupted_write_are_removed_at_restart(make_server: Callable[..., BkServer]) -> None:
    server = make_server()
    leftovers = [server.data_dir / "files" / "aggregates" / ".agg.npz.x1.tmp",
                 server.data_dir / "files" / "uploads" / ".up.npz.x2.tmp", server.data_dir / "incoming" / "u.part"]
    for path in leftovers:
        path.write_bytes(b"partial")
    server.restart()
    assert [path for path in leftovers if path.exists()] == []
