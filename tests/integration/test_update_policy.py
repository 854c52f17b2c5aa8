"""The update transforms in a real round: float16 uploads through bk-server's FedAvg and back
into the model's dtypes, and the guard that keeps a diverged update from leaving the site."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import read_aggregate, read_update
from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import load_state
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.round import RoundResult, run_round
from prefect_branchkey.flows.updates.deltas import CHUNK
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdatePolicy, UpdateRefusedError
from prefect_branchkey.tasks import LeafSession

from ..support.bkserver import BkServer, credentials_for
from ..support.reference import fedavg_reference

FLOAT16 = UpdatePolicy(upload_precision="float16")


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every round here runs against the session's Prefect server."""


class Diverging(Participant):
    """Trains fine for `good_rounds`, then returns NaN weights."""

    def __init__(self, good_rounds: int) -> None:
        self.good_rounds = good_rounds

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        value = np.nan if round_number > self.good_rounds else float(round_number)
        return TrainResult(10.0, [np.full(4, value, np.float32)])


def two_leaves(server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path,
               participants: tuple[Participant, Participant], policy: UpdatePolicy) -> list[RoundResult]:
    """One round of a two-leaf federation, both leaves at once."""
    federation = server.federation(leaves=2)
    sessions = [open_session(credentials_for(server, leaf)) for leaf in federation.leaves]
    results: list[RoundResult] = [None, None]  # type: ignore[list-item]

    def leaf(index: int) -> None:
        results[index] = run_round(sessions[index], participants[index], tmp_path / f"leaf-{index}", policy=policy)

    threads = [threading.Thread(target=leaf, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_float16_uploads_are_averaged_in_float16_by_the_platform(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    participants = (DigitsSoftmax(leaf_index=0, leaves=2), DigitsSoftmax(leaf_index=1, leaves=2))
    results = two_leaves(server, open_session, tmp_path, participants, FLOAT16)
    assert [r.status for r in results] == ["completed", "completed"]
    updates = [read_update(tmp_path / f"leaf-{i}" / "updates" / "run1-round1.npz") for i in range(2)]
    assert all(layer.dtype == np.float16 for _, layers in updates for layer in layers)
    aggregate = read_aggregate(results[0].global_model or "")
    for got, want in zip(aggregate, fedavg_reference(updates), strict=True):
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_float16_round_records_its_precision_and_the_models_own_dtypes(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    participants = (DigitsSoftmax(leaf_index=0, leaves=2), DigitsSoftmax(leaf_index=1, leaves=2))
    two_leaves(server, open_session, tmp_path, participants, FLOAT16)
    row = history_rows(tmp_path / "leaf-0")[0]
    assert row["upload_precision"] == "float16"
    assert row["bytes_up"] == (tmp_path / "leaf-0" / "updates" / "run1-round1.npz").stat().st_size
    state = load_state(tmp_path / "leaf-0", row["leaf_id"])
    assert state.model_dtypes and set(state.model_dtypes) == {np.dtype(np.float32).str}


def test_diverged_update_fails_the_round_and_nothing_is_uploaded(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))
    participant = Diverging(good_rounds=1)
    assert run_round(session, participant, tmp_path / "leaf").status == "completed"
    with pytest.raises(UpdateRefusedError, match="layer 0 holds NaN"):
        run_round(session, participant, tmp_path / "leaf")
    assert server.status(federation.branch_id)["rounds"][1]["updates"] == 0
    state = load_state(tmp_path / "leaf", federation.leaves[0]["id"])
    assert (state.round, state.phase) == (2, "idle")


def test_round_that_would_exceed_the_dp_budget_is_declined_and_uploads_nothing(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))
    policy = UpdatePolicy(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=2.0, epsilon_budget=8.0))
    participant = DigitsSoftmax(leaf_index=0, leaves=1)
    statuses = [run_round(session, participant, tmp_path / "leaf", policy=policy).status for _ in range(3)]
    assert statuses == ["completed", "completed", "budget-spent"]
    assert server.status(federation.branch_id)["rounds"][2]["updates"] == 0
    rows = history_rows(tmp_path / "leaf")
    assert [row["status"] for row in rows] == ["completed", "completed", "budget-spent"]
    assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] == rows[2]["dp_epsilon"] <= 8.0
    assert {(row["clip_norm"], row["noise_multiplier"], row["dp_delta"]) for row in rows} == {(1.0, 2.0, 1e-5)}


class Jumping(Participant):
    """Steady small updates, then one a hundred times larger (a diverging local model)."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        base = global_model[0] if global_model is not None else np.zeros(4, np.float32)
        step = 100.0 if round_number == 5 else 1.0
        return TrainResult(10.0, [(base + step).astype(np.float32)])


def test_norm_guard_refuses_an_outlier_update_in_a_real_round(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    session = open_session(credentials_for(server, federation.leaves[0]))
    policy = UpdatePolicy(max_update_norm_ratio=20)
    statuses = [run_round(session, Jumping(), tmp_path / "leaf", policy=policy).status for _ in range(4)]
    assert statuses == ["completed"] * 4
    with pytest.raises(UpdateRefusedError, match=re.escape("100.0 times the median")):
        run_round(session, Jumping(), tmp_path / "leaf", policy=policy)
    assert server.status(federation.branch_id)["rounds"][4]["updates"] == 0


class LiveArrays(Participant):
    """Trains in its own arrays and offers them, so each global model is loaded into them in place."""

    def __init__(self, offset: float) -> None:
        self.model = [np.zeros(CHUNK + 3, np.float32), np.zeros((4, 4), np.float32)]
        self.offset = offset
        self.trained_in_own_arrays: list[bool] = []
        self.evaluated: list[list[np.ndarray]] = []
        self.started_from: list[list[np.ndarray]] = []
        self.trained: list[list[np.ndarray]] = []

    def parameters(self) -> list[np.ndarray]:
        return self.model

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        self.trained_in_own_arrays.append(global_model is None or all(
            a is b for a, b in zip(global_model, self.model, strict=True)))
        self.started_from.append([layer.copy() for layer in self.model])
        for layer in self.model:
            layer += self.offset
        self.trained.append([layer.copy() for layer in self.model])
        return TrainResult(1.0 + self.offset, self.model)

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        self.evaluated.append([layer.copy() for layer in global_model])
        return {}


def test_a_participant_offering_its_arrays_gets_each_global_model_in_place_through_guard_and_dp(
        server: BkServer, open_session: Callable[..., LeafSession], tmp_path: Path) -> None:
    federation = server.federation(leaves=2)
    sessions = [open_session(credentials_for(server, leaf)) for leaf in federation.leaves]
    participants = [LiveArrays(1.0), LiveArrays(3.0)]
    clip = 1.0
    policy = UpdatePolicy(max_update_norm_ratio=50, privacy=PrivacySettings(clip_norm=clip, noise_multiplier=1e-9))

    def leaf_round(index: int, results: list[RoundResult]) -> None:
        results.append(run_round(sessions[index], participants[index], tmp_path / f"leaf-{index}", policy=policy))

    for round_number in (1, 2, 3):
        results: list[RoundResult] = []
        threads = [threading.Thread(target=leaf_round, args=(i, results)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(r.status for r in results) == ["completed", "completed"]
        updates = [read_update(tmp_path / f"leaf-{i}" / "updates" / f"run1-round{round_number}.npz") for i in range(2)]
        aggregate = read_aggregate(results[0].global_model or "")
        for got, want in zip(aggregate, fedavg_reference(updates), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        for index, participant in enumerate(participants):
            assert all(np.array_equal(a, b) for a, b in zip(participant.evaluated[-1], aggregate, strict=True))
            base, trained = participant.started_from[-1], participant.trained[-1]
            norm = np.sqrt(sum(float(np.sum((t - b).astype(np.float64) ** 2)) for t, b in zip(trained, base,
                                                                                               strict=True)))
            clipped = [b + (t - b) * np.float32(min(1.0, clip / norm)) for t, b in zip(trained, base, strict=True)]
            for sent, want in zip(updates[index][1], clipped, strict=True):
                np.testing.assert_allclose(sent, want, atol=1e-5,
                                           err_msg="DP clips the delta to the global model the round started from")
    assert all(all(p.trained_in_own_arrays) for p in participants)
