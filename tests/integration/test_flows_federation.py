"""A federation of Prefect flows: three leaves, five rounds, over each transport; what it records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.federation.simulation import federated_simulation
from prefect_branchkey.flows.leaf.audit import read_entries, trail_path
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.publishing.observability import artifact_key

from ..support.bkserver import BkServer
from ..support.flow_helpers import artifacts, events

ROUNDS = 5
BRANCH = "fed-digits"


@pytest.fixture(scope="module", params=["websocket", "amqp"])
def simulated(request: pytest.FixtureRequest, prefect_api: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BkServer, Path, dict]]:
    """Run the digits simulation (3 leaves, 5 rounds) once per transport; return server, work root, results."""
    if request.param == "amqp":
        request.getfixturevalue("rabbitmq")
    root = tmp_path_factory.mktemp(f"federation-{request.param}")
    server = BkServer(root / "data", amqp=request.param == "amqp").start()
    try:
        federation = server.federation(leaves=3, branch=BRANCH)
        write_credentials(root / "creds", federation.leaves)
        results = federated_simulation(server.url, str(root / "creds"), str(root / "leaves"), rounds=ROUNDS,
                                       transport=request.param, amqp_host="127.0.0.1", aggregation_timeout_s=120)
        yield server, root / "leaves", results
    finally:
        server.stop()
        if server.amqp:
            server.cleanup_broker()


def test_every_leaf_completes_every_round_and_accuracy_rises(simulated: tuple[BkServer, Path, dict]) -> None:
    _, _, results = simulated
    assert len(results) == 3
    for rounds in results.values():
        assert [r.status for r in rounds] == ["completed"] * ROUNDS
        accuracy = [r.eval_metrics["accuracy"] for r in rounds]
        assert accuracy[-1] > accuracy[0], accuracy
    aggregation_ids = {tuple(r.record.aggregation_id for r in rounds) for rounds in results.values()}
    assert len(aggregation_ids) == 1, "all leaves took part in the same aggregations"


def test_history_has_one_correct_row_per_round(simulated: tuple[BkServer, Path, dict]) -> None:
    server, leaves, results = simulated
    for leaf_dir in leaf_dirs(leaves):
        rows = history_rows(leaf_dir)
        assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        assert {r["status"] for r in rows} == {"completed"}
        first = rows[0]
        assert first["leaf_name"] == leaf_dir.name and first["run_number"] == 1
        assert first["weighting"] > 0 and first["bytes_up"] > 0 and first["bytes_down"] > 0
        assert first["eval_metrics"]["accuracy"] > 0 and "loss" in first["train_metrics"]
        assert first["flow_run_id"] and first["finished_at"] > first["started_at"]
        assert all(r["round_s"] >= (r["train_s"] or 0) for r in rows)
    status = server.status(next(iter(results.values()))[0].record.branch_id)
    assert [r["aggregation_id"] for r in status["rounds"] if r["status"] == "aggregated"] == [
        r["aggregation_id"] for r in history_rows(leaf_dirs(leaves)[0])]


def test_metrics_reach_the_platform(simulated: tuple[BkServer, Path, dict]) -> None:
    server, _, results = simulated
    branch_id = next(iter(results.values()))[0].record.branch_id
    metrics = server.status(branch_id)["metrics"]
    assert {m["mode"] for m in metrics} == {"train", "test"}
    assert len(metrics) == 3 * ROUNDS * 2


def test_artifacts_hold_the_history_and_a_summary(simulated: tuple[BkServer, Path, dict], prefect_api: str) -> None:
    _, leaves, _ = simulated
    leaf = leaf_dirs(leaves)[0].name
    table = artifacts(prefect_api, artifact_key("history", leaf))
    assert len(table) >= ROUNDS, "one version per round under a stable key"
    latest = json.loads(table[0]["data"])
    assert [row["round"] for row in latest][-ROUNDS:] == list(range(1, ROUNDS + 1))
    assert "eval_accuracy" in latest[0]
    summary = artifacts(prefect_api, artifact_key("summary", leaf))[0]["data"]
    assert f"Round {ROUNDS} of run 1" in summary and "eval accuracy" in summary


def test_a_completed_event_per_round_names_leaf_and_branch(simulated: tuple[BkServer, Path, dict],
                                                           prefect_api: str) -> None:
    _, _, results = simulated
    record = next(iter(results.values()))[0].record
    found = events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{record.leaf_id}", ROUNDS)
    assert len(found) == ROUNDS
    event = found[0]
    assert event["resource"]["prefect.resource.name"] == record.leaf_name
    assert any(r["prefect.resource.id"] == f"branchkey.branch.{record.branch_id}" for r in event["related"])
    assert "accuracy" in event["payload"]["eval_metrics"]


def test_federation_artifact_puts_every_leaf_side_by_side_per_round(simulated: tuple[BkServer, Path, dict],
                                                                  prefect_api: str) -> None:
    _, leaves, _ = simulated
    latest = json.loads(artifacts(prefect_api, artifact_key("federation", BRANCH))[0]["data"])
    assert [row["round"] for row in latest] == list(range(1, ROUNDS + 1))
    for row in latest:
        assert row["leaves"] == 3
        accuracies = [row[f"{leaf.name} accuracy"] for leaf in leaf_dirs(leaves)]
        assert row["mean accuracy"] == pytest.approx(sum(accuracies) / 3, abs=1e-4)


def test_federation_summary_embeds_a_chart_the_ui_renders(simulated: tuple[BkServer, Path, dict],
                                                          prefect_api: str) -> None:
    summary = artifacts(prefect_api, artifact_key("federation-summary", BRANCH))[0]["data"]
    assert f"Round {ROUNDS} of run 1: 3 of 3 leaves" in summary
    assert "](data:image/svg+xml;base64," in summary, "an image as a data URI (inline <svg> is stripped)"


def test_each_leaf_round_is_a_task_run_named_by_leaf_and_round_with_its_steps(
        simulated: tuple[BkServer, Path, dict], prefect_api: str) -> None:
    _, _, results = simulated
    rounds = next(iter(results.values()))
    record = rounds[0].record
    # A leaf whose upload completed a round may get the round's aggregation in the upload's reply
    # (the platform aggregated before answering); that round has no wait, so no wait task run.
    waited = [r.round for r in rounds if r.record.wait_s is not None]
    expected = {f"{record.leaf_name}-round-{n}" for n in range(1, ROUNDS + 1)} | {
        f"{step}-round-{n}" for n in range(1, ROUNDS + 1)
        for step in ("upload", "download", "send-test-metrics")} | {
        f"wait-for-aggregation-round-{n}" for n in waited}
    every_wait = {f"wait-for-aggregation-round-{n}" for n in range(1, ROUNDS + 1)}
    # Task runs reach the server as events, which it records a moment later. Asked for by name: a
    # leaf's five rounds make more task runs than one page of the API (200) holds.
    deadline = time.monotonic() + 30
    while True:
        tasks = httpx.post(f"{prefect_api}/task_runs/filter", timeout=30, json={
            "task_runs": {"name": {"any_": sorted(expected | every_wait)},
                          "tags": {"all_": [f"leaf:{record.leaf_name}", f"branch:{BRANCH}",
                                            f"branch-id:{record.branch_id}"]}}, "limit": 200,
        }).json()
        names = {task["name"] for task in tasks}
        if expected <= names or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected <= names, sorted(expected - names)
    assert names & every_wait == expected & every_wait, "a wait task run for each round that waited, none other"


def test_federation_artifacts_are_titled_by_the_branch_name(simulated: tuple[BkServer, Path, dict],
                                                            prefect_api: str) -> None:
    summary = artifacts(prefect_api, artifact_key("federation-summary", BRANCH))[0]
    assert summary["key"] == f"branchkey-federation-summary-{BRANCH}"
    assert f"Federation {BRANCH}" in summary["data"] and BRANCH in summary["description"]


def test_leaf_artifacts_name_the_branch(simulated: tuple[BkServer, Path, dict], prefect_api: str) -> None:
    _, leaves, _ = simulated
    leaf = leaf_dirs(leaves)[0].name
    summary = artifacts(prefect_api, artifact_key("summary", leaf))[0]
    assert f"branch {BRANCH}" in summary["description"] and f"# {leaf} (branch {BRANCH})" in summary["data"]


def test_every_round_materializes_the_global_model_from_each_leafs_update(
        simulated: tuple[BkServer, Path, dict], prefect_api: str) -> None:
    _, _, results = simulated
    record = next(iter(results.values()))[0].record
    key = f"branchkey://{record.tree_id}/{record.branch_id}/global-model"
    found = events(prefect_api, "prefect.asset.materialization.succeeded", key, 3 * ROUNDS)
    assert len(found) == 3 * ROUNDS, "one materialization per leaf per round"
    assert found[0]["resource"]["prefect.resource.name"] == f"{BRANCH} global model"
    upstream = {r["prefect.resource.id"] for e in found for r in e["related"] if r["prefect.resource.role"] == "asset"}
    assert upstream == {f"branchkey://{record.tree_id}/{record.branch_id}/leaves/{rounds[0].record.leaf_id}/update"
                        for rounds in results.values()}
    rounds_seen = sorted({(e["payload"]["round"], e["payload"]["aggregation_id"]) for e in found})
    assert rounds_seen == [(r.round, r.record.aggregation_id) for r in next(iter(results.values()))]


def test_history_and_summary_name_the_best_round_by_accuracy(simulated: tuple[BkServer, Path, dict],
                                                             prefect_api: str) -> None:
    _, leaves, _ = simulated
    leaf_dir = leaf_dirs(leaves)[0]
    rows = history_rows(leaf_dir)
    best = max(rows, key=lambda r: r["eval_metrics"]["accuracy"])
    assert rows[-1]["primary_metric"] == "accuracy" and rows[-1]["best_round"] == best["round"]
    assert rows[-1]["best_value"] == pytest.approx(best["eval_metrics"]["accuracy"])
    assert (leaf_dir / "models" / "best.npz").samefile(leaf_dir / "models" / f"{best['aggregation_id']}.npz")
    summary = artifacts(prefect_api, artifact_key("summary", leaf_dir.name))[0]["data"]
    assert f"**Best global model:** round {best['round']} of run 1" in summary


def test_each_leafs_audit_trail_records_every_payload_that_left_or_arrived(
        simulated: tuple[BkServer, Path, dict]) -> None:
    server, leaves, _ = simulated
    for leaf_dir in leaf_dirs(leaves):
        entries = list(read_entries(leaf_dir))
        rows = history_rows(leaf_dir)
        per_round = [("upload", "sending"), ("upload", "confirmed"), ("download", "received"),
                     ("metrics", "sending"), ("metrics", "confirmed"), ("metrics", "sending"), ("metrics", "confirmed")]
        assert [(e["kind"], e["step"]) for e in entries] == per_round * ROUNDS
        for row, upload, confirmed, download in zip(rows, entries[0::7], entries[1::7], entries[2::7], strict=True):
            assert upload["facts"]["destination"] == server.url and upload["facts"]["round"] == row["round"]
            assert upload["facts"]["bytes"] == row["bytes_up"]
            assert upload["key"].endswith(upload["facts"]["sha256"][:40])
            assert [layer["name"] for layer in upload["facts"]["layers"]] == ["layer_0", "layer_1"]
            assert confirmed["facts"]["file_id"] == row["file_id"]
            assert download["key"] == row["aggregation_id"] and download["facts"]["bytes"] == row["bytes_down"]
        test_metrics = entries[5]["facts"]
        assert test_metrics["mode"] == "test" and test_metrics["metrics"] == rows[0]["eval_metrics"]


def test_no_session_token_enters_an_audit_trail(simulated: tuple[BkServer, Path, dict]) -> None:
    _, leaves, _ = simulated
    for leaf_dir in leaf_dirs(leaves):
        token = json.loads((leaves.parent / "creds" / f"{leaf_dir.name}.json").read_text())["session_token"]
        assert token.encode() not in trail_path(leaf_dir).read_bytes()


def test_bk_audit_verify_proves_each_trail_holds_the_head_its_summary_names(simulated: tuple[BkServer, Path, dict],
                                                                          prefect_api: str) -> None:
    _, leaves, _ = simulated
    for leaf_dir in leaf_dirs(leaves):
        head = history_rows(leaf_dir)[-1]["audit_head"]
        summary = artifacts(prefect_api, artifact_key("summary", leaf_dir.name))[0]["data"]
        assert f"Audit trail head `{head}`" in summary
        # A simulated leaf runs every round in one flow run: 3 payloads a round.
        assert f"**Sent by this run:** {3 * ROUNDS} payload(s)" in summary
        verified = subprocess.run([str(Path(sys.executable).with_name("bk")), "audit", "verify", str(leaf_dir),
                                   "--head", head], capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0, verified.stderr
        assert f"{7 * ROUNDS} entries, chain intact, head {head}" in verified.stdout


def leaf_dirs(work_root: Path) -> list[Path]:
    """The leaves' work dirs under the simulation's work root (beside its sampling record)."""
    return sorted(p for p in work_root.iterdir() if p.is_dir())
