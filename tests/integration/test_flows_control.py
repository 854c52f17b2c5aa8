"""Flows under the platform's control (pause, stop), leaves that decline, and secrets kept out."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.leaf.history import history_dir
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.round import run_round
from prefect_branchkey.flows.training import federated_training
from prefect_branchkey.tasks import LeafSession

from ..support.bkserver import BkServer, credentials_for


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every flow here runs against the session's Prefect server."""


class OnBattery(Participant):
    """A device that declines every round."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        raise AssertionError("a declining participant is never asked to train")

    def participate(self, round_number: int) -> bool:
        return False


def test_training_ends_cleanly_when_the_platform_stops_the_run(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=2)
    credentials = credentials_for(server, federation.leaves[0])
    threading.Timer(2.0, server.run, args=(federation.branch_id, "stop")).start()
    results = federated_training(credentials, "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                                 str(tmp_path / "leaf"), rounds=3, participant_options={"leaf_index": 0, "leaves": 2})
    assert [r.status for r in results] == ["stopped"]


def test_round_waits_while_paused_and_runs_when_started(server: BkServer, tmp_path: Path,
                                                       open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1)
    server.run(federation.branch_id, "pause")
    threading.Timer(1.5, server.run, args=(federation.branch_id, "start")).start()
    started = time.monotonic()
    session = open_session(credentials_for(server, federation.leaves[0]))
    result = run_round(session, DigitsSoftmax(leaf_index=0, leaves=1), tmp_path / "leaf")
    assert result.status == "completed" and time.monotonic() - started >= 1.0


def test_declined_round_uploads_nothing(server: BkServer, tmp_path: Path,
                                        open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=2)
    result = run_round(open_session(credentials_for(server, federation.leaves[0])), OnBattery(), tmp_path / "leaf")
    assert result.status == "declined"
    assert server.status(federation.branch_id)["rounds"][0]["updates"] == 0


def test_training_stops_at_the_target_metric(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    results = federated_training(credentials_for(server, federation.leaves[0]),
                                 "prefect_branchkey.flows.examples.digits:DigitsSoftmax", str(tmp_path / "leaf"),
                                 rounds=20, participant_options={"leaf_index": 0, "leaves": 1},
                                 target_metric="accuracy", target_value=0.5)
    assert len(results) < 20 and results[-1].eval_metrics["accuracy"] >= 0.5


def test_session_token_is_absent_from_logs_artifacts_history_and_state(
    server: BkServer, tmp_path: Path, prefect_api: str, caplog: pytest.LogCaptureFixture
) -> None:
    federation = server.federation(leaves=1)
    leaf = federation.leaves[0]
    token = leaf["session_token"]
    with caplog.at_level("DEBUG"):
        federated_training(credentials_for(server, leaf), "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                           str(tmp_path / "leaf"), rounds=2, participant_options={"leaf_index": 0, "leaves": 1})
    assert caplog.records and token not in caplog.text
    for path in [*history_dir(tmp_path / "leaf").iterdir(), tmp_path / "leaf" / "state.json"]:
        assert token.encode() not in path.read_bytes(), path
    stored = httpx.post(f"{prefect_api}/artifacts/filter", json={}, timeout=30).json()
    assert stored and token not in str(stored)
    logs = httpx.post(f"{prefect_api}/logs/filter", json={"limit": 200}, timeout=30).json()
    assert token not in str(logs)
    runs = httpx.post(f"{prefect_api}/flow_runs/filter", json={"limit": 50}, timeout=30).json()
    assert token not in str(runs), "flow run parameters must not carry the token"


def test_rounds_per_run_ends_a_run_and_the_next_run_continues(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    credentials = credentials_for(server, federation.leaves[0])
    options = {"leaf_index": 0, "leaves": 1}
    first = federated_training(credentials, "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                               str(tmp_path / "leaf"), rounds=None, rounds_per_run=2, participant_options=options)
    second = federated_training(credentials, "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                                str(tmp_path / "leaf"), rounds=None, rounds_per_run=2, participant_options=options)
    assert [r.round for r in first] == [1, 2] and [r.round for r in second] == [3, 4]
