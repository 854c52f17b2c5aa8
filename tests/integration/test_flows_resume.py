"""Resuming: a leaf killed mid-round continues where it stopped; the platform counts its update once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.leaf.audit import AuditTrailBrokenError, acknowledge_break, trail_path, verify_trail
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import load_state, save_state
from prefect_branchkey.flows.round import Timeouts, run_round
from prefect_branchkey.tasks import LeafSession

from ..support.bkserver import BkServer, credentials_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every round here runs against the session's Prefect server."""


def start_leaf(server: BkServer, leaf: dict, work_dir: Path, tmp_path: Path, prefect_api: str) -> subprocess.Popen:
    creds = tmp_path / "leaf.json"
    creds.write_text(json.dumps(leaf))
    env = os.environ | {"PREFECT_API_URL": prefect_api}
    return subprocess.Popen([sys.executable, "-m", "tests.support.leaf_process", str(creds), server.url, "amqp",
                             str(work_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_phase(work_dir: Path, leaf_id: str, phase: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (work_dir / "state.json").exists() and load_state(work_dir, leaf_id).phase == phase:
            return
        if process.poll() is not None:
            raise AssertionError(f"leaf exited early: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"leaf never reached phase {phase}")


def kill_leaf_after_upload(server: BkServer, leaf: dict, work_dir: Path, tmp_path: Path, prefect_api: str) -> None:
    """Run the leaf's round in its own process and SIGKILL it once its upload is accepted and saved."""
    process = start_leaf(server, leaf, work_dir, tmp_path, prefect_api)
    wait_for_phase(work_dir, leaf["id"], "uploaded", process)
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def crash_after_accepted_upload(server: BkServer, leaf: dict, work_dir: Path, tmp_path: Path,
                                prefect_api: str) -> None:
    """As if the process died after the platform accepted the upload but before the state said so."""
    kill_leaf_after_upload(server, leaf, work_dir, tmp_path, prefect_api)
    state = load_state(work_dir, leaf["id"])
    state.phase = "trained"
    save_state(work_dir, state)


def test_leaf_killed_between_upload_and_aggregation_resumes_with_one_update(
    amqp_server: BkServer, tmp_path: Path, prefect_api: str, open_session: Callable[..., LeafSession]
) -> None:
    federation = amqp_server.federation(leaves=2)
    killed, other = federation.leaves
    work_dir = tmp_path / "killed-leaf"
    kill_leaf_after_upload(amqp_server, killed, work_dir, tmp_path, prefect_api)

    run_round(open_session(credentials_for(amqp_server, other, "amqp")), DigitsSoftmax(leaf_index=1, leaves=2),
              tmp_path / "other-leaf")
    session = open_session(credentials_for(amqp_server, killed, "amqp"))
    result = run_round(session, DigitsSoftmax(leaf_index=0, leaves=2), work_dir)
    assert result.status == "completed" and result.round == 1
    round_one = amqp_server.status(federation.branch_id)["rounds"][0]
    assert round_one["updates"] == 2 and round_one["leaves"] == sorted([killed["id"], other["id"]])
    assert history_rows(work_dir)[0]["aggregation_id"] == round_one["aggregation_id"]
    assert load_state(work_dir, killed["id"]).round == 2


def test_upload_accepted_just_before_a_crash_is_not_counted_twice(amqp_server: BkServer, tmp_path: Path,
                                                                  prefect_api: str,
                                                                  open_session: Callable[..., LeafSession]) -> None:
    """The crash falls after the platform accepted the upload but before the state said so."""
    federation = amqp_server.federation(leaves=2)
    leaf = federation.leaves[0]
    work_dir = tmp_path / "leaf"
    crash_after_accepted_upload(amqp_server, leaf, work_dir, tmp_path, prefect_api)

    def second_leaf() -> None:
        session = open_session(credentials_for(amqp_server, federation.leaves[1], "amqp"))
        run_round(session, DigitsSoftmax(leaf_index=1, leaves=2), tmp_path / "other")

    helper = threading.Thread(target=second_leaf)
    helper.start()
    session = open_session(credentials_for(amqp_server, leaf, "amqp"))
    result = run_round(session, DigitsSoftmax(leaf_index=0, leaves=2), work_dir)
    helper.join(60)
    assert result.status == "completed"
    assert amqp_server.status(federation.branch_id)["rounds"][0]["updates"] == 2


def test_rerun_after_a_completed_round_starts_the_next_one(server: BkServer, tmp_path: Path,
                                                           open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))
    first = run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), tmp_path / "leaf")
    second = run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), tmp_path / "leaf")
    assert (first.round, second.round) == (1, 2)
    assert [r["round"] for r in history_rows(tmp_path / "leaf")] == [1, 2]


def test_a_broken_audit_trail_stops_the_upload_until_acknowledged_and_the_round_resumes(
        server: BkServer, tmp_path: Path, open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))
    work_dir = tmp_path / "leaf"
    run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), work_dir)
    trail = trail_path(work_dir)
    trail.write_bytes(trail.read_bytes().replace(b'"mode":"test"', b'"mode":"tset"'))
    with pytest.raises(AuditTrailBrokenError, match="bk audit acknowledge"):
        run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), work_dir)
    assert load_state(work_dir, session.credentials.leaf_id).phase == "trained", "resumable at the upload"
    assert [r["round"] for r in server.status(federation.branch_id)["rounds"] if r["updates"]] == [1], "nothing sent"
    acknowledge_break(work_dir, "reviewed: a test edited the trail")
    assert run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), work_dir).status == "completed"
    assert verify_trail(work_dir).intact


def test_round_closed_while_the_leaf_was_down_is_picked_up_on_resume(amqp_server: BkServer, tmp_path: Path,
                                                                     prefect_api: str,
                                                                     open_session: Callable[..., LeafSession]) -> None:
    """The crash falls after the platform accepted the upload, and the round closes before the rerun."""
    federation = amqp_server.federation(leaves=2)
    leaf, other = federation.leaves
    work_dir = tmp_path / "leaf"
    crash_after_accepted_upload(amqp_server, leaf, work_dir, tmp_path, prefect_api)
    run_round(open_session(credentials_for(amqp_server, other, "amqp")), DigitsSoftmax(leaf_index=1, leaves=2),
              tmp_path / "other")
    session = open_session(credentials_for(amqp_server, leaf, "amqp"))
    result = run_round(session, DigitsSoftmax(leaf_index=0, leaves=2), work_dir, Timeouts(aggregation_s=20))
    round_one = amqp_server.status(federation.branch_id)["rounds"][0]
    assert result.status == "completed" and result.record.aggregation_id == round_one["aggregation_id"]
    assert round_one["updates"] == 2
