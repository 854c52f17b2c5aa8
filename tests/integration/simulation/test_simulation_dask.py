"""A simulated federation on real Dask clusters: a local one, one started beforehand and reached by
its address, client sampling checked against the platform's records, and a worker killed mid-round."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import distributed
import numpy as np
import psutil
import pytest

from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.federation import simulation as simulation_module
from prefect_branchkey.flows.federation.simulation import (
    SAMPLING_FILE,
    SCHEDULER_HTTP_ADDRESS,
    SimulationError,
    dask_runner,
    simulate,
)
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.participant import Participant, ParticipantError, TrainResult

from ...support.bkserver import BkServer

pytestmark = pytest.mark.usefixtures("prefect_api", "forked_dask_workers")


class Steady(Participant):
    """A small model whose evaluation of round 2 pauses once on leaf 0 (so a test can kill its worker
    there, after its update was counted); the pause's pid is written to `pause_file`."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}

    def __init__(self, leaf_index: int = 0, leaves: int = 1, pause_file: str = "") -> None:
        self.leaf_index, self.pause_file = leaf_index, pause_file

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        base = global_model[0] if global_model is not None else np.zeros(8, np.float32)
        return TrainResult(1.0 + self.leaf_index, [base + np.float32(self.leaf_index + 1)])

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        pause = Path(self.pause_file) if self.pause_file else None
        if pause is not None and self.leaf_index == 0 and round_number == 2 and not pause.exists():
            pause.write_text(str(os.getpid()))
            time.sleep(60)
        return {"accuracy": float(global_model[0][0])}


def started_cluster(workers: int, threads: int, processes: bool = True) -> distributed.LocalCluster:
    """A cluster started beforehand, as a user would, without a dashboard; its scheduler's HTTP
    routes on a free port, so the tests' clusters side by side do not contend for 8787."""
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes,
                                    dashboard_address=None,
                                    scheduler_kwargs={"dashboard_address": SCHEDULER_HTTP_ADDRESS})


def federation_files(server: BkServer, root: Path, leaves: int, per_round: int, deadline_s: float = 60) -> Path:
    """A federation of `leaves` whose rounds close at `per_round` updates (or with what they have
    after `deadline_s`); its credentials dir."""
    federation = server.federation(leaves=leaves, min_updates=per_round, quorum=1, round_deadline_s=deadline_s)
    write_credentials(root / "creds", federation.leaves)
    return root / "creds"


def platform_rounds(server: BkServer, work_root: Path) -> list[tuple[int, list[str]]]:
    """Per aggregated round of the platform: its updates and the leaves (by name) they came from."""
    leaf_id = {row["leaf_id"]: path.name for path in work_root.iterdir() if path.is_dir()
               for row in history_rows(path)[:1]}
    branch_id = next(row["branch_id"] for path in work_root.iterdir() if path.is_dir() for row in history_rows(path))
    return [(r["updates"], sorted(leaf_id[i] for i in r["leaves"]))
            for r in server.status(branch_id)["rounds"] if r["status"] == "aggregated"]


def test_each_drawn_leaf_sends_one_update_per_round_on_a_local_cluster(server: BkServer, tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=6, per_round=3)
    results = simulate(server.url, str(creds), str(tmp_path / "leaves"), workers=2, participant=f"{__name__}:Steady",
                       rounds=3, fraction=0.5, seed=11, aggregation_timeout_s=120)
    sampling = json.loads((tmp_path / "leaves" / SAMPLING_FILE).read_text())
    drawn = [row["chosen"].split(", ") for row in sampling["rounds"]]
    assert platform_rounds(server, tmp_path / "leaves") == [(3, sorted(leaves)) for leaves in drawn]
    assert sum(r.status == "completed" for done in results.values() for r in done) == 9


def test_a_cluster_started_beforehand_is_reached_by_its_address(server: BkServer, tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=4, per_round=4)
    with started_cluster(2, 2) as cluster:
        results = simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address=cluster.scheduler_address,
                           participant=f"{__name__}:Steady", rounds=2, aggregation_timeout_s=120)
    assert {name: [r.status for r in done] for name, done in results.items()} == {
        name: ["completed", "completed"] for name in results}


def test_an_address_where_no_scheduler_answers_is_refused_and_nothing_starts(
        server: BkServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation_module, "CONNECT_TIMEOUT_S", 2)
    creds = federation_files(server, tmp_path, leaves=2, per_round=2)
    with pytest.raises(SimulationError, match=re.escape("no Dask scheduler answers at tcp://127.0.0.1:9")):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address="tcp://127.0.0.1:9",
                 participant=f"{__name__}:Steady", rounds=1)
    assert not (tmp_path / "leaves").exists()


def test_local_clusters_side_by_side_serve_their_scheduler_http_on_free_loopback_ports() -> None:
    """Two simulations on one machine: neither scheduler takes Dask's default 8787, so neither warns
    that the port is in use, and neither listens beyond the loopback."""
    options = dict(dask_runner(None, 1, 2).cluster_kwargs, n_workers=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Port \d+ is already in use", category=UserWarning)
        with distributed.LocalCluster(**options) as first, distributed.LocalCluster(**options) as second:
            served = [(c.scheduler.http_server.address, c.scheduler.http_server.port) for c in (first, second)]
    assert [host for host, _ in served] == ["127.0.0.1", "127.0.0.1"]
    assert 8787 not in [port for _, port in served]


def test_a_cluster_with_fewer_threads_than_a_rounds_leaves_is_refused(server: BkServer, tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=3, per_round=3)
    with (started_cluster(1, 2, processes=False) as cluster,
          pytest.raises(SimulationError, match="runs 2 tasks at once; a round needs 3")):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address=cluster.scheduler_address,
                 participant=f"{__name__}:Steady", rounds=1)


def test_a_platform_closing_rounds_at_another_count_than_the_draw_is_refused(server: BkServer,
                                                                          tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=4, per_round=4)
    with pytest.raises(SimulationError, match="closes a round at 4 updates but each round draws 2"):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), participant=f"{__name__}:Steady", rounds=1,
                 fraction=0.5)


def test_a_sampled_branch_without_a_round_deadline_is_refused(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=4, min_updates=2)
    write_credentials(tmp_path / "creds", federation.leaves)
    with pytest.raises(SimulationError, match="no round deadline"):
        simulate(server.url, str(tmp_path / "creds"), str(tmp_path / "leaves"), participant=f"{__name__}:Steady",
                 rounds=1, fraction=0.5)


def test_a_participant_that_cannot_be_imported_is_refused_before_anything_starts(server: BkServer,
                                                                                 tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2)
    with pytest.raises(ParticipantError, match="cannot import participant 'nowhere:Nobody'"):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), participant="nowhere:Nobody", rounds=1)
    assert not (tmp_path / "leaves").exists()


class Failing(Participant):
    """A site whose training always fails."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        raise RuntimeError("out of memory")


def test_the_simulation_fails_when_every_drawn_leaf_of_a_round_fails(server: BkServer, tmp_path: Path) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2)
    with pytest.raises(SimulationError, match="every leaf drawn for round 1 failed"):
        simulate(server.url, str(creds), str(tmp_path / "leaves"), workers=1, participant=f"{__name__}:Failing",
                 rounds=2)


class FailsRoundOneOnLeafOne(Steady):
    """Leaf 1's training fails in round 1; every other round of every leaf trains."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        if self.leaf_index == 1 and round_number == 1:
            raise RuntimeError("out of memory")
        return super().train(global_model, round_number)


def test_a_round_that_went_on_without_a_drawn_leaf_fails_the_simulation_naming_it(
        server: BkServer, tmp_path: Path) -> None:
    """Round 1 closes at its deadline with leaf 0's update alone. A loaded machine may let round 2
    close at its deadline before one of its leaves too: then it is named as well."""
    creds = federation_files(server, tmp_path, leaves=2, per_round=2, deadline_s=10)
    with pytest.raises(SimulationError) as raised:
        simulate(server.url, str(creds), str(tmp_path / "leaves"), workers=2,
                 participant=f"{__name__}:FailsRoundOneOnLeafOne", rounds=2)
    message = str(raised.value)
    short = [number for number, (updates, _) in enumerate(platform_rounds(server, tmp_path / "leaves"), start=1)
             if updates < 2]
    assert short[:1] == [1], short
    assert message.startswith(f"{len(short)} of 2 rounds went on without part of their draw"), message
    assert re.search(r": round 1: \S+ failed", message) and ("round 2:" in message) == (2 in short), message


@pytest.fixture
def cluster() -> Iterator[distributed.LocalCluster]:
    with started_cluster(2, 2) as started:
        yield started


def test_a_worker_killed_mid_round_resumes_the_leaf_elsewhere_counting_its_update_once(
        server: BkServer, tmp_path: Path, cluster: distributed.LocalCluster) -> None:
    creds = federation_files(server, tmp_path, leaves=2, per_round=2)
    pause = tmp_path / "paused.pid"
    killed: list[int] = []
    killer = _kill_when_paused(pause, killed)
    results = simulate(server.url, str(creds), str(tmp_path / "leaves"), dask_address=cluster.scheduler_address,
                       participant=f"{__name__}:Steady", participant_options={"pause_file": str(pause)}, rounds=3,
                       aggregation_timeout_s=120)
    killer.join(timeout=5)
    assert killed and not psutil.pid_exists(killed[0]), "the worker running the leaf's round 2 was killed"
    assert {name: [r.status for r in done] for name, done in results.items()} == {
        name: ["completed"] * 3 for name in results}
    assert [updates for updates, _ in platform_rounds(server, tmp_path / "leaves")] == [2, 2, 2]
    first = sorted((tmp_path / "leaves").iterdir())[0]
    assert [(r["round"], r["status"]) for r in history_rows(first)] == [(n, "completed") for n in (1, 2, 3)]


def _kill_when_paused(pause: Path, killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs the worker process that wrote `pause` as soon as it appears, noting its pid."""

    def kill() -> None:
        deadline = time.monotonic() + 120
        while not pause.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        if pause.exists():
            pid = int(pause.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread
