"""A simulated federation whose Dask worker is lost mid-round, as reported: the worker's connection
to the scheduler breaks while its leaves run, it closes itself and its nanny (which then does not
restart it), and its process lingers until killed. The round still gets every drawn leaf's update,
or the simulation fails naming the round and leaf, and no leaf's update lands in a round it was not
drawn for."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import distributed
import numpy as np
import pytest

from prefect_branchkey.flows.federation import cluster as cluster_module
from prefect_branchkey.flows.federation.simulation import SimulationError, simulate
from prefect_branchkey.flows.participant import TrainResult

from ...support.bkserver import BkServer
from .test_simulation_dask import Steady, federation_files, platform_rounds, started_cluster

pytestmark = pytest.mark.usefixtures("prefect_api", "forked_dask_workers")


class LosesItsWorker(Steady):
    """Leaf 0's first training from round `lose_round` on breaks its Dask worker's connection to the
    scheduler, once (keyed by the file `pause_file`), then holds its thread as a round waiting for
    its aggregation does, so the worker's process lingers until its nanny kills it."""

    def __init__(self, leaf_index: int = 0, leaves: int = 1, pause_file: str = "", lose_round: int = 2) -> None:
        super().__init__(leaf_index, leaves, pause_file)
        self.lose_round = lose_round

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        marker = Path(self.pause_file) if self.pause_file else None
        if marker is not None and self.leaf_index == 0 and round_number >= self.lose_round and not marker.exists():
            marker.write_text(str(os.getpid()))
            worker = distributed.get_worker()
            worker.loop.add_callback(worker.batched_stream.comm.abort)
            time.sleep(60)
        return super().train(global_model, round_number)


@pytest.fixture
def two_single_threads() -> Iterator[distributed.LocalCluster]:
    """A cluster reached by address whose two workers run one task each: a lost one is not replaced."""
    with started_cluster(2, 1) as started:
        yield started


def test_a_worker_lost_mid_round_is_replaced_and_its_leaf_still_uploads_in_that_round(
        server: BkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2, deadline_s=120)
    marker = tmp_path / "lost.pid"
    with caplog.at_level(logging.WARNING):
        results = simulate(server.url, str(creds), str(tmp_path / "leaves"), workers=2,
                           participant=f"{__name__}:LosesItsWorker", participant_options={"pause_file": str(marker)},
                           rounds=3, aggregation_timeout_s=120)
    assert marker.exists(), "leaf 0's worker lost its scheduler in round 2"
    assert {name: [r.status for r in done] for name, done in results.items()} == {
        name: ["completed"] * 3 for name in results}
    assert [updates for updates, _ in platform_rounds(server, tmp_path / "leaves")] == [2, 2, 2]
    departures = [r.getMessage() for r in caplog.records if "left the cluster" in r.getMessage()]
    assert len(departures) == 1 and "round 2" in departures[0], departures


def test_a_leaf_whose_task_dask_gave_up_on_is_submitted_again_within_its_round(
        server: BkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2, deadline_s=120)
    marker = tmp_path / "lost.pid"
    with caplog.at_level(logging.WARNING), dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        results = simulate(server.url, str(creds), str(tmp_path / "leaves"), workers=2,
                           participant=f"{__name__}:LosesItsWorker", participant_options={"pause_file": str(marker)},
                           rounds=2, aggregation_timeout_s=120)
    assert {name: [r.status for r in done] for name, done in results.items()} == {
        name: ["completed"] * 2 for name in results}
    assert [updates for updates, _ in platform_rounds(server, tmp_path / "leaves")] == [2, 2]
    again = [r.getMessage() for r in caplog.records if "its round is submitted again" in r.getMessage()]
    assert len(again) == 1 and "KilledWorker" in again[0], again


def test_a_round_that_closed_before_a_lost_workers_leaf_could_run_again_fails_the_simulation(
        server: BkServer, tmp_path: Path, two_single_threads: distributed.LocalCluster) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2, deadline_s=10)
    marker = tmp_path / "lost.pid"
    with pytest.raises(SimulationError, match=r"1 of 1 rounds went on without part of their draw.*round 1: \S+ failed"):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address=two_single_threads.scheduler_address,
                 participant=f"{__name__}:LosesItsWorker",
                 participant_options={"pause_file": str(marker), "lose_round": 1}, rounds=1, aggregation_timeout_s=120)
    assert marker.exists(), "leaf 0's worker lost its scheduler in round 1"
    assert [updates for updates, _ in platform_rounds(server, tmp_path / "leaves")] == [1], \
        "round 1 closed at its deadline with one update, and the lost leaf uploaded into no later round"


def test_a_cluster_by_address_that_lost_a_worker_for_good_stops_the_simulation_before_the_next_round(
        server: BkServer, tmp_path: Path, two_single_threads: distributed.LocalCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "CAPACITY_WAIT_S", 2.0)
    creds = federation_files(server, tmp_path, leaves=2, per_round=2, deadline_s=10)
    marker = tmp_path / "lost.pid"
    with pytest.raises(SimulationError, match=r"round [23] cannot start: the Dask cluster runs 1 tasks at once "
                                              r"since it lost workers"):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address=two_single_threads.scheduler_address,
                 participant=f"{__name__}:LosesItsWorker",
                 participant_options={"pause_file": str(marker), "lose_round": 1}, rounds=3, aggregation_timeout_s=120)
    assert marker.exists()
