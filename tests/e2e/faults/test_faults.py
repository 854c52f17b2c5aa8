"""Faults against a federation of real processes; each ends with every round's aggregate exact
(one update per leaf, none stale) and every leaf done, after failing clearly if it must."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.bk_server.faults import CRASH_ENV, CRASH_EXIT_CODE
from prefect_branchkey.flows.leaf.audit import read_entries, verify_trail
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import save_state
from prefect_branchkey.tasks.upload import idempotency_key

from ...support.faulty_proxy import FaultyProxy
from .conftest import record
from .federation import FaultFederation, LeafProcess, kill_server

pytestmark = pytest.mark.fault

MakeFederation = Callable[..., FaultFederation]


def killed(leaf: LeafProcess, timeout: float = 120) -> None:
    """Wait until the leaf's run has SIGKILLed itself at its fault point."""
    assert leaf.process is not None
    leaf.process.wait(timeout)
    assert leaf.process.returncode == -9, leaf.last_output()


def mid_round_two(make_federation: MakeFederation, transport: str) -> FaultFederation:
    """A federation held in round 2: leaf 2 died there before uploading (`supervise()` reruns
    it), so the other leaves wait in round 2 for as long as the fault needs."""
    federation = make_federation(transport)
    federation.start(**{"1": "2:trained"})
    killed(federation.leaves[1])
    federation.wait_until(lambda: federation.round_has(2, 2), "both other leaves' updates in round 2")
    return federation


@pytest.mark.parametrize("phase", ["trained", "uploaded", "aggregated", "downloaded"])
def test_leaf_killed_at_each_step_completes_on_rerun(make_federation: MakeFederation, transport: str,
                                                     phase: str) -> None:
    federation = make_federation(transport)
    federation.start(**{"0": f"2:{phase}"})
    killed(federation.leaves[0])
    federation.mark_fault()
    federation.supervise()
    record(federation.verify(f"leaf SIGKILL after saving '{phase}'"))


def test_leaf_killed_between_an_accepted_upload_and_its_audit_confirmation(make_federation: MakeFederation,
                                                                          transport: str) -> None:
    federation = make_federation(transport)
    federation.start(**{"0": "2:upload-accepted"})
    leaf = federation.leaves[0]
    killed(leaf)
    uploads = [e for e in read_entries(leaf.work_dir) if e["kind"] == "upload" and e["facts"].get("round") == 2]
    assert [e["step"] for e in uploads] == ["sending"], "killed after the platform accepted, before confirming"
    federation.mark_fault()
    federation.supervise()
    record(federation.verify("leaf SIGKILL between an accepted upload and its audit entry"))
    trail = verify_trail(leaf.work_dir)
    assert trail.intact and trail.unconfirmed == [], trail.problem
    round_two = [e for e in read_entries(leaf.work_dir) if e["kind"] == "upload" and e["key"] == uploads[0]["key"]]
    assert [e["step"] for e in round_two] == ["sending", "confirmed"], "recorded once, confirmed by the rerun"


def test_leaf_killed_while_waiting_and_back_after_its_round_closed(make_federation: MakeFederation,
                                                                  transport: str) -> None:
    federation = make_federation(transport)
    federation.start(**{"0": "2:uploaded"})
    killed(federation.leaves[0])
    federation.mark_fault()
    federation.wait_until(lambda: federation.aggregated(2), "round 2 aggregated without the killed leaf listening")
    federation.supervise()
    record(federation.verify("leaf SIGKILL mid-wait, back after its round closed"))


def test_server_killed_mid_round(make_federation: MakeFederation, transport: str) -> None:
    federation = mid_round_two(make_federation, transport)
    kill_server(federation)
    federation.mark_fault()
    time.sleep(2)
    federation.server.start()
    federation.supervise()
    record(federation.verify("bk-server SIGKILL mid-round"))


def federation_whose_server_crashes_at(make_federation: MakeFederation, transport: str, point: str,
                                       monkeypatch: pytest.MonkeyPatch) -> FaultFederation:
    """Start a federation whose bk-server dies at `point` (in round 1), and wait for that."""
    monkeypatch.setenv(CRASH_ENV, point)
    federation = make_federation(transport)
    monkeypatch.delenv(CRASH_ENV)
    federation.start()
    assert federation.server.process is not None
    assert federation.server.process.wait(120) == CRASH_EXIT_CODE
    federation.mark_fault()
    federation.server.process = None
    return federation


def test_server_crash_mid_fedavg_leaves_no_partial_aggregate(make_federation: MakeFederation, transport: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    federation = federation_whose_server_crashes_at(make_federation, transport, "fedavg-layer-written", monkeypatch)
    aggregates = federation.server.data_dir / "files" / "aggregates"
    partial = set(aggregates.glob(".*.tmp"))
    assert partial, "the crash did not leave a partial aggregate"
    federation.server.start()
    # The restarted server aggregates the round again at once, in a temporary file of its own.
    assert not partial & set(aggregates.glob(".*.tmp")), "the crash's partial aggregate is still there"
    federation.supervise()
    record(federation.verify("bk-server crash mid-FedAvg"))


def test_server_crash_between_aggregate_commit_and_notice(make_federation: MakeFederation, transport: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    federation = federation_whose_server_crashes_at(make_federation, transport, "aggregate-committed", monkeypatch)
    federation.server.start()
    federation.supervise()
    record(federation.verify("bk-server crash after committing an aggregate, before its notice"))


@pytest.mark.rabbitmq
@pytest.mark.exclusive
def test_broker_restarted_mid_wait(make_federation: MakeFederation, rabbitmq: None) -> None:
    federation = mid_round_two(make_federation, "amqp")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    federation.mark_fault()
    subprocess.run([*sudo, "rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    federation.supervise()
    record(federation.verify("RabbitMQ restarted mid-wait"))


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["drop", "drop-after"])
def test_upload_connection_cut_or_reply_dropped(make_federation: MakeFederation, rabbitmq: None, kind: str) -> None:
    federation = make_federation("amqp")
    proxy = FaultyProxy(federation.server.url)
    try:
        proxy.inject(kind, "/api/v1/file/upload", times=3)
        federation.mark_fault()
        federation.start(host=proxy.url)
        federation.supervise()
    finally:
        proxy.close()
    what = "connection cut mid-upload" if kind == "drop" else "upload accepted, reply dropped"
    record(federation.verify(what))


def restore_old_state(leaf: LeafProcess, round_number: int, phase: str) -> None:
    """Write the state the leaf had in `round_number` (idle, or uploaded and waiting), as a VM
    snapshot or a restored backup would bring it back, from its own history and files."""
    state = leaf.state()
    assert state is not None
    rows = {r["round"]: r for r in history_rows(leaf.work_dir) if r["status"] == "completed"}
    earlier = [rows[n]["aggregation_id"] for n in range(1, round_number)]
    state.round, state.consumed_aggregations = round_number, earlier
    state.global_model = str(leaf.work_dir / "models" / f"{earlier[-1]}.npz") if earlier else None
    state.clear_round()
    if phase == "uploaded":
        row = rows[round_number]
        archive = leaf.work_dir / "updates" / f"run1-round{round_number}.npz"
        state.phase, state.archive, state.file_id = "uploaded", str(archive), row["file_id"]
        state.idempotency_key = idempotency_key(leaf.leaf_id, 1, round_number, sha256_file(archive).hex())
        state.counted_in, state.weighting = [1, round_number], row["weighting"]
    save_state(leaf.work_dir, state)


@pytest.mark.parametrize(("round_number", "phase"), [(2, "idle"), (1, "uploaded")])
def test_leaf_restored_from_an_old_state_resyncs(make_federation: MakeFederation, transport: str,
                                                 round_number: int, phase: str) -> None:
    federation = make_federation(transport)
    federation.start(**{"0": "3:idle"})
    leaf = federation.leaves[0]
    killed(leaf)
    restore_old_state(leaf, round_number, phase)
    federation.mark_fault()
    federation.supervise()
    outcome = record(federation.verify(f"leaf restored from a state of round {round_number} ({phase})"))
    assert any(r["status"] == "resynced" for r in history_rows(leaf.work_dir)), outcome


def test_leaf_offline_for_rounds_rejoins_at_the_platforms_round(make_federation: MakeFederation,
                                                                transport: str) -> None:
    federation = make_federation(transport, min_updates=2, rounds=4)
    federation.start(first=0, **{"0": "2:idle"})
    killed(federation.leaves[0])
    federation.mark_fault()
    federation.wait_until(lambda: federation.aggregated(3), "rounds 2 and 3 aggregated without the offline leaf")
    federation.supervise()
    record(federation.verify("leaf offline for two rounds"))
    rows = [(r["round"], r["status"]) for r in history_rows(federation.leaves[0].work_dir)]
    assert any(status == "resynced" and round_number >= 3 for round_number, status in rows), rows


def test_two_runs_of_one_leaf_do_one_round_at_a_time(make_federation: MakeFederation, transport: str) -> None:
    federation = make_federation(transport)
    federation.start(**{"1": "2:trained"})
    killed(federation.leaves[1])
    leaf = federation.leaves[0]
    federation.wait_until(lambda: (state := leaf.state()) is not None and (state.round, state.phase) == (2, "uploaded"),
                          "leaf 1 waiting in round 2 (leaf 2 is down)")
    second = leaf.spawn()
    federation.mark_fault()
    second.wait(120)
    assert "is in use by another run of this leaf" in leaf.log.read_text(), leaf.last_output()
    assert leaf.running()
    federation.supervise()
    record(federation.verify("two runs of one leaf at once"))


def test_run_paused_mid_round_then_resumed(make_federation: MakeFederation, transport: str) -> None:
    federation = mid_round_two(make_federation, transport)
    federation.server.run(federation.branch_id, "pause")
    federation.mark_fault()
    time.sleep(3)
    federation.server.run(federation.branch_id, "start")
    federation.supervise()
    record(federation.verify("run paused mid-round, then started"))


def test_run_stopped_mid_round_then_a_new_run(make_federation: MakeFederation, transport: str) -> None:
    federation = mid_round_two(make_federation, transport)
    federation.server.run(federation.branch_id, "stop")
    federation.mark_fault()
    federation.wait_until(lambda: not any(leaf.running() for leaf in federation.leaves), "every leaf's run ended")
    for leaf in (federation.leaves[0], federation.leaves[2]):
        assert leaf.process is not None and leaf.process.returncode == 0, leaf.last_output()
        assert '"status": "stopped"' in leaf.log.read_text()
    federation.server.run(federation.branch_id, "start")
    federation.start()
    federation.supervise()
    record(federation.verify("run stopped mid-round, then a new run", runs=(2,)))


def test_without_catch_up_a_leaf_that_missed_its_notice_fails_clearly_and_rejoins(
    make_federation: MakeFederation,
) -> None:
    federation = make_federation("websocket", extensions=False)
    federation.start(**{"0": "2:uploaded"})
    leaf = federation.leaves[0]
    killed(leaf)
    federation.mark_fault()
    federation.wait_until(lambda: federation.aggregated(2), "round 2 aggregated while the leaf was down")
    leaf.start(FAULT_AGGREGATION_TIMEOUT_S="4")  # the notice it waits for will not come: no need to wait long
    leaf.process.wait(120)
    assert leaf.process.returncode != 0
    assert "AggregationTimeoutError" in leaf.log.read_text()
    leaf.start()
    federation.wait_until(lambda: federation.aggregated(3), "round 3 aggregated with the rejoined leaf", timeout=180)
    record(federation.verify("no catch-up (official platform's replies): missed notice", strict=False))
