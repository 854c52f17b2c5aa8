"""A federation of real processes for the fault suite, and the checks every fault ends with.

`FaultFederation` runs a `bk-server` (WebSocket or AMQP notifications) and one OS process per
leaf running `federated-training`; `supervise()` reruns a leaf whose run failed (as a
scheduler would) until every leaf has done its rounds. `verify()` then reads the platform's
own database and files and the leaves' work dirs: every round's aggregate is FedAvg of exactly
one update per leaf, each update is the one its leaf trained for that round, and each leaf's
history names the platform's aggregation for every round it completed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefect_branchkey.bk_blocks.archive import read_aggregate, read_update
from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import LeafState, load_state

from ...support.bkserver import BkServer
from .launcher import LeafRun, start_leaf

PROJECT = Path(__file__).resolve().parents[3]


@dataclass
class Outcome:
    """What one fault did to the federation, for the suite's summary table."""

    fault: str
    transport: str
    survived: bool
    lost: int
    double_counted: int
    reruns: int
    recovery_s: float | None
    finished_s: float | None
    problems: list[str] = field(default_factory=list)


@dataclass
class LeafProcess:
    """One leaf: its credentials, work dir, and the process running its training (rerun on failure)."""

    index: int
    credentials: dict[str, str] = field(repr=False)  # holds the session token: kept out of failure messages
    work_dir: Path
    logs: Path
    arguments: list[str]
    env: dict[str, str]
    host: str = ""
    process: LeafRun | None = None
    runs: int = 0
    failed_runs: list[Path] = field(default_factory=list)

    @property
    def leaf_id(self) -> str:
        return self.credentials["id"]

    def start(self, **extra_env: str) -> None:
        self.process = self.spawn(**extra_env)

    def spawn(self, **extra_env: str) -> LeafRun:
        """A new run of this leaf (its own log file), against `host`."""
        self.runs += 1
        self.log = self.logs / f"{self.credentials['name']}-run-{self.runs}.log"
        return start_leaf([self.arguments[0], self.host, *self.arguments[1:]], self.env | extra_env, PROJECT,
                          self.log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def state(self) -> LeafState | None:
        if not (self.work_dir / "state.json").exists():
            return None
        return load_state(self.work_dir, self.leaf_id)

    def last_output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class FaultFederation:
    """A bk-server and `leaves` leaf processes training `rounds` rounds of a NoisyModel."""

    def __init__(self, root: Path, transport: str, prefect_api: str, *, leaves: int = 3,
                 min_updates: int | None = None, rounds: int = 3, size: int = 2000, extensions: bool = True,
                 aggregation_timeout_s: float = 120) -> None:
        self.root, self.transport, self.rounds = root, transport, rounds
        options: dict[str, object] = {} if extensions else {"extensions": False}
        self.server = BkServer(root / "platform" / "data", amqp=transport == "amqp", options=options).start()
        self.federation = self.server.federation(leaves=leaves, min_updates=min_updates or leaves)
        self.branch_id = self.federation.branch_id
        env = os.environ | {"PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "INFO"}
        env.pop("FAULT_KILL_AT", None)
        env.pop("FAULT_AGGREGATION_TIMEOUT_S", None)
        self.leaves: list[LeafProcess] = []
        for index, credentials in enumerate(self.federation.leaves):
            path = root / f"leaf-{index + 1}.json"
            path.write_text(json.dumps(credentials))
            work_dir = root / f"leaf-{index + 1}"
            arguments = [str(path), transport, str(work_dir), str(rounds), str(size), str(10.0 + 5 * index),
                         str(aggregation_timeout_s)]
            self.leaves.append(LeafProcess(index, credentials, work_dir, root / "logs", arguments, env,
                                           self.server.url))
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.fault_at: float | None = None
        self.finished_at: float | None = None

    # -- running ---------------------------------------------------------------------------

    def start(self, host: str | None = None, first: int | None = None, **kill_at: str) -> None:
        """Start every leaf (talking to `host`, the platform by default); `kill_at={"0": "2:uploaded"}`
        makes leaf 0 SIGKILL itself right after saving that step. With `first`, that leaf starts
        alone and the others once it has trained its first round: where a round needs fewer than
        every leaf, the others could otherwise finish rounds before it has started."""
        for leaf in sorted(self.leaves, key=lambda leaf: leaf.index != first):
            leaf.host = host or self.server.url
            extra = {"FAULT_KILL_AT": kill_at[str(leaf.index)]} if str(leaf.index) in kill_at else {}
            leaf.start(**extra)
            if leaf.index == first:
                self.wait_until(lambda leaf=leaf: leaf.state() is not None,
                                f"leaf {first + 1} to train its first round")

    def mark_fault(self) -> None:
        """Note when the fault hit, to measure recovery from."""
        self.fault_at = time.time()

    def leaf_done(self, leaf: LeafProcess) -> bool:
        state = leaf.state()
        return leaf.process is not None and leaf.process.poll() == 0 and state is not None and state.round > self.rounds

    def supervise(self, timeout: float = 300, rerun: bool = True,
                  until: Callable[[], bool] | None = None) -> None:
        """Rerun any leaf whose run ended without finishing its rounds (a failure, or a kill),
        until every leaf is done (or `until()` holds); fail with the leaves' output on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return
            if until is None and all(self.leaf_done(leaf) for leaf in self.leaves):
                self.finished_at = time.time()
                return
            for leaf in self.leaves:
                if leaf.process is not None and leaf.process.poll() is not None and not self.leaf_done(leaf):
                    if leaf.process.returncode != 0:
                        leaf.failed_runs.append(leaf.log)
                    if rerun:
                        leaf.start()
            time.sleep(0.1)
        raise TimeoutError("the federation did not finish:\n" + self.describe())

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise TimeoutError(f"never saw {what}:\n" + self.describe())

    def rounds_status(self) -> list[dict[str, object]]:
        return self.server.status(self.branch_id)["rounds"]

    def round_has(self, round_number: int, updates: int) -> bool:
        return any(r["round"] == round_number and r["updates"] >= updates for r in self.rounds_status())

    def aggregated(self, round_number: int, run_number: int = 1) -> bool:
        return any(r["run_number"] == run_number and r["round"] == round_number and r["status"] == "aggregated"
                   for r in self.rounds_status())

    def stop(self) -> None:
        for leaf in self.leaves:
            leaf.kill()
        self.server.stop(hard=True)
        if self.server.amqp:
            self.server.cleanup_broker()

    def describe(self) -> str:
        lines = []
        for leaf in self.leaves:
            state = leaf.state()
            lines.append(f"--- {leaf.credentials['name']}: runs {leaf.runs}, state "
                         f"{(state.run_number, state.round, state.phase) if state else None}\n{leaf.last_output()}")
        return "\n".join(lines)

    # -- checking --------------------------------------------------------------------------

    def verify(self, fault: str, runs: tuple[int, ...] = (1,), strict: bool = True) -> Outcome:
        """Check every aggregated round of `runs` against the uploads and, when `strict`, against
        the archives each leaf trained for that round and the leaves' histories (without the
        platform's round in its replies, a leaf that missed a notice rejoins one round behind in
        its own numbering, so only the platform's side can be checked)."""
        problems: list[str] = []
        lost = double = 0
        with sqlite3.connect(f"file:{self.server.data_dir / 'bk_server.sqlite3'}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            rounds = db.execute("SELECT * FROM rounds WHERE branch_id = ? ORDER BY run_number, round",
                                (self.branch_id,)).fetchall()
            for round_ in rounds:
                if round_["run_number"] not in runs or round_["status"] in ("open", "abandoned"):
                    continue
                uploads = db.execute(
                    "SELECT * FROM uploads WHERE branch_id = ? AND run_number = ? AND round = ? "
                    "AND status = 'accepted'",
                    (self.branch_id, round_["run_number"], round_["round"])).fetchall()
                where = f"run {round_['run_number']} round {round_['round']}"
                if round_["status"] != "aggregated":
                    lost += 1
                    problems.append(f"{where} is {round_['status']}, not aggregated")
                    continue
                double += self._check_updates(where, round_, uploads, problems, strict)
                self._check_aggregate(where, round_, uploads, problems)
            expected = {(run, n) for run in runs for n in range(1, self.rounds + 1)}
            aggregated = {(r["run_number"], r["round"]) for r in rounds if r["status"] == "aggregated"}
            missing = sorted(expected - aggregated)
            if missing:
                lost += len(missing)
                problems.append(f"rounds never aggregated: {missing}")
            by_round = {(r["run_number"], r["round"]): r["aggregation_id"] for r in rounds}
            repeated = db.execute("SELECT leaf_id, aggregation_id, mode, COUNT(*) AS n FROM metrics "
                                  "WHERE branch_id = ? GROUP BY leaf_id, aggregation_id, mode HAVING n > 1",
                                  (self.branch_id,)).fetchall()
            problems += [f"metrics {m['mode']} of aggregation {m['aggregation_id']} stored {m['n']} times"
                         for m in repeated]
        if strict:
            double += self._check_histories(by_round, runs, problems)
        reruns = sum(len(leaf.failed_runs) for leaf in self.leaves)
        finished = self.finished_at - self.fault_at if self.finished_at and self.fault_at else None
        return Outcome(fault, self.transport, not problems, lost, double, reruns, self.recovery_s(), finished, problems)

    def _check_updates(self, where: str, round_: sqlite3.Row, uploads: list[sqlite3.Row], problems: list[str],
                       strict: bool) -> int:
        """One update per leaf, each (when `strict`) the archive that leaf trained for this round;
        returns how many were not."""
        wrong = 0
        leaf_ids = [u["leaf_id"] for u in uploads]
        if len(set(leaf_ids)) != len(leaf_ids):
            wrong += len(leaf_ids) - len(set(leaf_ids))
            problems.append(f"{where}: more than one update from a leaf")
        for upload in uploads if strict else []:
            leaf = next(leaf for leaf in self.leaves if leaf.leaf_id == upload["leaf_id"])
            archive = leaf.work_dir / "updates" / f"run{round_['run_number']}-round{round_['round']}.npz"
            if not archive.exists() or sha256_file(archive).hex() != upload["digest"]:
                wrong += 1
                problems.append(f"{where}: {leaf.credentials['name']}'s update is not the one it trained for "
                                "this round (a stale update)")
        return wrong

    def _check_aggregate(self, where: str, round_: sqlite3.Row, uploads: list[sqlite3.Row],
                         problems: list[str]) -> None:
        """The aggregate equals numpy's weighted mean of the accepted updates."""
        files = self.server.data_dir / "files"
        total = sum(u["weighting"] for u in uploads)
        layers = [read_update(files / "uploads" / f"{u['file_id']}.npz")[1] for u in uploads]
        expected = [sum(np.asarray(layer[i], np.float64) * (u["weighting"] / total)
                        for layer, u in zip(layers, uploads, strict=True))
                    for i in range(len(layers[0]))]
        actual = read_aggregate(files / "aggregates" / f"{round_['aggregation_id']}.npz")
        if not all(np.allclose(a, e.astype(a.dtype), rtol=1e-5, atol=1e-6)
                   for a, e in zip(actual, expected, strict=False)):
            problems.append(f"{where}: the aggregate is not FedAvg of its updates")

    def _check_histories(self, by_round: dict[tuple[int, int], str], runs: tuple[int, ...],
                         problems: list[str]) -> int:
        """Every leaf has a row for each round, and a completed row names that round's aggregation."""
        wrong = 0
        for leaf in self.leaves:
            rows = [r for r in history_rows(leaf.work_dir) if r["run_number"] in runs]
            for row in rows:
                if (row["status"] == "completed"
                        and by_round.get((row["run_number"], row["round"])) != row["aggregation_id"]):
                    wrong += 1
                    problems.append(f"{leaf.credentials['name']}'s history row for round {row['round']} names "
                                    f"aggregation {row['aggregation_id']}, not that round's")
            covered = {(r["run_number"], r["round"]) for r in rows}
            gaps = [n for n in range(1, self.rounds + 1) if (runs[-1], n) not in covered]
            if gaps and not any(r["status"] == "resynced" for r in rows):
                problems.append(f"{leaf.credentials['name']} has no history row for rounds {gaps}")
        return wrong

    def recovery_s(self) -> float | None:
        """Seconds from the fault to the federation's next aggregation (it is moving again)."""
        if self.fault_at is None:
            return None
        after = [r["aggregated_at"] for r in self.rounds_status()
                 if r["aggregated_at"] is not None and r["aggregated_at"] >= self.fault_at]
        return min(after) - self.fault_at if after else None


def kill_server(federation: FaultFederation) -> None:
    """SIGKILL the platform's process group (as a crash or an OOM kill would)."""
    assert federation.server.process is not None
    os.killpg(federation.server.process.pid, signal.SIGKILL)
    federation.server.process.wait(30)
    federation.server.process = None

