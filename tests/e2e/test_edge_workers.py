"""End to end, how a site operator starts and stops things: `bk dev prefect-server` (the trial
Prefect server on embedded PostgreSQL) and `bk edge worker LEAF` (a leaf's process worker that a
SIGTERM stops within a bound), as real processes against a real Prefect server and bk-server; and
the lost-run automation that sets Crashed a run whose worker and process died.

A leaf per test: its own one-leaf federation (all set up by one `bk edge setup`), and a rounds
deployment on its queue whose participant (`tests.support.slow_participant:SlowModel`) trains
for as long as the test asks. Timers are compressed: graces of 1 s, the shortest lost-run window
(60 s), which runs out while the other tests run. A failing test prints the logs of the processes
it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.bk_dev.processes import free_port, spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.deployments.automations import MIN_LOST_RUN_S
from prefect_branchkey.deployments.worker import CANCEL_BOUND_S, TEARDOWN_S
from prefect_branchkey.flows.leaf.history import history_rows

from ..support.bkserver import BkServer
from ..support.http import LOCAL
from ..support.process_helpers import left_running, new_marker

pytestmark = [pytest.mark.e2e]

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PARTICIPANT = "tests.support.slow_participant:SlowModel"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# An idle worker has nothing to wait for: it must be gone within its teardown.
IDLE_BOUND_S = TEARDOWN_S
GRACE_S = 1.0
# Every test's leaf, set up at once for the module.
LEAVES = ("lost", "idle", "finishes", "cancelled", "no-new-runs", "hurried", "resumed", "blockless")


def _api(api: str, method: str, path: str, body: Any = None) -> Any:
    response = LOCAL.request(method, f"{api}{path}", json=body)
    response.raise_for_status()
    return response.json() if response.content else None


def _wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _exit_within(process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until the process exited (AssertionError past `timeout`)."""
    began = time.monotonic()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pid {process.pid} still running {timeout:.0f} s after SIGTERM") from None
    return time.monotonic() - began


@dataclass
class Logs:
    """The logs of the processes a test started, printed when it fails."""

    paths: list[Path] = field(default_factory=list)

    def add(self, path: Path) -> Path:
        self.paths.append(path)
        return path

    def dump(self) -> None:
        for path in self.paths:
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            print(f"\n===== {path} =====\n{text[-20000:]}", file=sys.stderr)


@pytest.fixture
def logs(request: pytest.FixtureRequest) -> Iterator[Logs]:
    """Print every registered log when the test failed (pytest counts a failed call before the
    fixtures' teardown)."""
    collected = Logs()
    failed_before = request.session.testsfailed
    yield collected
    if request.session.testsfailed > failed_before:
        collected.dump()


@dataclass
class Platform:
    """The Prefect server (on embedded PostgreSQL), bk-server and the environment workers get."""

    prefect: LocalPrefectServer
    server: BkServer
    root: Path
    marker: tuple[str, str]

    @property
    def api(self) -> str:
        return self.prefect.api_url

    def env(self, **extra: str) -> dict[str, str]:
        """A worker's environment: the server, the checkout (code and the test participant), the
        leaves' work root, and the marker that finds every process it starts."""
        return self.prefect.client_env() | {
            "BRANCHKEY_PROJECT_DIR": str(PROJECT), "BRANCHKEY_WORK_ROOT": str(self.root / "leaves"),
            "PYTHONPATH": str(PROJECT), "PATH": f"{BIN}:{os.environ['PATH']}",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            self.marker[0]: self.marker[1], **extra}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("edge-workers")
    marker = new_marker()
    # The lost-run automation is checked each second rather than each 5 s (Prefect's default).
    prefect = LocalPrefectServer(root / "prefect-home", database="postgres",
                                 settings={"PREFECT_LOGGING_LEVEL": "INFO",
                                           "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S"})
    server = BkServer(root / "bk")
    try:
        prefect.start()
        server.start()
        platform = Platform(prefect, server, root, marker)
        # One `bk edge setup` for every test's leaf (each process start costs seconds); the lost-run
        # automation it creates watches every BranchKey run, and ended runs are none of its business.
        _set_up_leaves(platform, LEAVES, "--lost-run-after", f"{MIN_LOST_RUN_S:g}")
        yield platform
    finally:
        prefect.stop()
        server.stop()


def _bk(platform: Platform, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bk", *arguments], env=platform.env(), capture_output=True, text=True, timeout=120)


def _set_up_leaves(platform: Platform, leaves: tuple[str, ...], *options: str) -> None:
    """A one-leaf federation per leaf, and one `bk edge setup` of all their Blocks and queues."""
    pairs = []
    for leaf in leaves:
        (path,) = write_credentials(platform.root / "creds" / leaf, platform.server.federation(leaves=1).leaves)
        pairs.append(f"{leaf}={path}")
    result = _bk(platform, "edge", "setup", *pairs, "--host", platform.server.url, *options)
    assert result.returncode == 0, result.stdout + result.stderr


def _deploy_rounds(platform: Platform, leaf: str) -> None:
    """The leaf's rounds deployment, on its queue."""
    flow_id = _api(platform.api, "POST", "/flows/", {"name": "federated-round"})["id"]
    _api(platform.api, "POST", "/deployments/", {
        "name": f"{leaf}-rounds", "flow_id": flow_id, "work_pool_name": "branchkey-edge", "work_queue_name": leaf,
        "entrypoint": "prefect_branchkey.flows.round:federated_round", "tags": ["branchkey"],
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}],
        "parameters": {"credentials": leaf, "participant": PARTICIPANT, "work_dir": f"$BRANCHKEY_WORK_ROOT/{leaf}",
                       "aggregation_timeout_s": 120, "run_timeout_s": 120}})


def _run_round(platform: Platform, leaf: str, train_s: float) -> tuple[str, Path]:
    """Start a round of the leaf's deployment whose training takes `train_s`; its run id and the
    file its training writes when it starts."""
    started = platform.root / f"{leaf}-{time.monotonic_ns()}.started"
    deployment = _api(platform.api, "GET", f"/deployments/name/federated-round/{leaf}-rounds")
    run = _api(platform.api, "POST", f"/deployments/{deployment['id']}/create_flow_run", {
        "parameters": {"participant_options": {"train_s": train_s, "started_file": str(started)}}})
    return run["id"], started


def _state(platform: Platform, run_id: str) -> dict[str, Any]:
    return _api(platform.api, "GET", f"/flow_runs/{run_id}")


def _start_worker(platform: Platform, logs: Logs, leaf: str, *options: str) -> subprocess.Popen[bytes]:
    log = logs.add(platform.root / f"worker-{leaf}-{time.monotonic_ns()}.log")
    worker = spawn(["bk", "edge", "worker", leaf, *options], log, env=platform.env())
    _wait_until(lambda: "started on" in log.read_text() or worker.poll() is not None, 60, "the worker to start")
    assert worker.poll() is None, log.read_text()
    return worker


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _heartbeats(platform: Platform, run_id: str) -> list[dict[str, Any]]:
    return _api(platform.api, "POST", "/events/filter", {"filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]}, "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50})["events"]


@dataclass
class LostRun:
    """The round left without worker or process, and the logs of what ran it."""

    run_id: str
    logs: Logs


@pytest.fixture(scope="module", autouse=True)
def lost_run(platform: Platform) -> Iterator[LostRun]:
    """A round whose process and worker are killed after its first heartbeat. Made
    before the module's other tests, so that the lost-run window (60 s, the shortest Prefect
    allows: two 30 s heartbeats) passes while they run rather than being waited out."""
    logs = Logs()
    worker: subprocess.Popen[bytes] | None = None
    try:
        _deploy_rounds(platform, "lost")
        worker = _start_worker(platform, logs, "lost", "--grace-s", "600")
        run_id, started = _run_round(platform, "lost", train_s=600)
        _wait_until(started.exists, 120, "the round's training to start")
        _wait_until(lambda: _heartbeats(platform, run_id), 60, "the run's first heartbeat at the server")
        run_pid = int(_state(platform, run_id)["infrastructure_pid"])
        os.killpg(run_pid, signal.SIGKILL)
        stop_group(worker, hard=True)
        assert _state(platform, run_id)["state_type"] == "RUNNING"
    except BaseException:
        logs.dump()
        if worker is not None:
            stop_group(worker, hard=True)
        raise
    yield LostRun(run_id, logs)


def test_an_idle_worker_exits_promptly_on_sigterm(platform: Platform, logs: Logs) -> None:
    _deploy_rounds(platform, "idle")
    worker = _start_worker(platform, logs, "idle", "--grace-s", "30")
    worker.send_signal(signal.SIGTERM)
    took = _exit_within(worker, IDLE_BOUND_S)
    print(f"idle worker stopped {took:.1f} s after SIGTERM")
    assert worker.returncode == 0


def test_a_round_that_ends_within_the_grace_completes_and_the_worker_then_exits(platform: Platform,
                                                                                logs: Logs) -> None:
    _deploy_rounds(platform, "finishes")
    worker = _start_worker(platform, logs, "finishes", "--grace-s", "60")
    run_id, started = _run_round(platform, "finishes", train_s=4)
    _wait_until(started.exists, 120, "the round's training to start")
    worker.send_signal(signal.SIGTERM)
    took = _exit_within(worker, 60 + CANCEL_BOUND_S + TEARDOWN_S)
    print(f"busy worker (round finishing within the grace) stopped {took:.1f} s after SIGTERM")
    assert _state(platform, run_id)["state_type"] == "COMPLETED"
    assert worker.returncode == 0


def test_a_round_past_the_grace_is_cancelled_and_leaves_no_process(platform: Platform, logs: Logs) -> None:
    _deploy_rounds(platform, "cancelled")
    worker = _start_worker(platform, logs, "cancelled", "--grace-s", str(GRACE_S))
    run_id, started = _run_round(platform, "cancelled", train_s=600)
    _wait_until(started.exists, 120, "the round's training to start")
    run_pid = int(_state(platform, run_id)["infrastructure_pid"])
    worker.send_signal(signal.SIGTERM)
    took = _exit_within(worker, GRACE_S + CANCEL_BOUND_S + TEARDOWN_S)
    print(f"busy worker (round cancelled after a {GRACE_S:g} s grace) stopped {took:.1f} s after SIGTERM")
    run = _state(platform, run_id)
    assert run["state_type"] == "CANCELLED", (run["state_name"], run["state"]["message"])
    assert _group_members(run_pid) == []
    assert left_running(platform.marker, timeout=5) == []


def test_a_stopping_worker_takes_no_new_run(platform: Platform, logs: Logs) -> None:
    _deploy_rounds(platform, "no-new-runs")
    worker = _start_worker(platform, logs, "no-new-runs", "--grace-s", "60")
    busy_id, started = _run_round(platform, "no-new-runs", train_s=6)
    _wait_until(started.exists, 120, "the round's training to start")
    worker.send_signal(signal.SIGTERM)
    late_id, _ = _run_round(platform, "no-new-runs", train_s=0)
    _exit_within(worker, 60 + CANCEL_BOUND_S + TEARDOWN_S)
    assert _state(platform, busy_id)["state_type"] == "COMPLETED"
    late = _state(platform, late_id)
    assert late["state_type"] == "SCHEDULED" and late["infrastructure_pid"] is None, late["state_name"]


def test_a_second_sigterm_cancels_the_run_without_waiting_out_the_grace(platform: Platform, logs: Logs) -> None:
    _deploy_rounds(platform, "hurried")
    worker = _start_worker(platform, logs, "hurried", "--grace-s", "600")
    run_id, started = _run_round(platform, "hurried", train_s=600)
    _wait_until(started.exists, 120, "the round's training to start")
    worker.send_signal(signal.SIGTERM)
    time.sleep(1)
    worker.send_signal(signal.SIGTERM)
    took = _exit_within(worker, CANCEL_BOUND_S + TEARDOWN_S + 1)
    print(f"busy worker stopped {took:.1f} s after a second SIGTERM")
    assert _state(platform, run_id)["state_type"] == "CANCELLED"


def test_a_round_cancelled_by_a_stop_completes_at_the_leafs_next_run(platform: Platform, logs: Logs) -> None:
    _deploy_rounds(platform, "resumed")
    worker = _start_worker(platform, logs, "resumed", "--grace-s", str(GRACE_S))
    cancelled_id, started = _run_round(platform, "resumed", train_s=600)
    _wait_until(started.exists, 120, "the round's training to start")
    worker.send_signal(signal.SIGTERM)
    _exit_within(worker, GRACE_S + CANCEL_BOUND_S + TEARDOWN_S)
    assert _state(platform, cancelled_id)["state_type"] == "CANCELLED"
    worker = _start_worker(platform, logs, "resumed", "--grace-s", "60")
    try:
        run_id, _ = _run_round(platform, "resumed", train_s=0)
        _wait_until(lambda: _state(platform, run_id)["state_type"] in TERMINAL, 180, "the next round")
        run = _state(platform, run_id)
        assert run["state_type"] == "COMPLETED", run["state"]["message"]
    finally:
        worker.send_signal(signal.SIGTERM)
        _exit_within(worker, 60 + CANCEL_BOUND_S + TEARDOWN_S)
    assert [(row["round"], row["status"]) for row in history_rows(platform.root / "leaves" / "resumed")] \
        == [(1, "completed")]


def test_a_worker_for_a_leaf_never_set_up_names_the_queue_and_the_setup_command(platform: Platform) -> None:
    result = _bk(platform, "edge", "worker", "nowhere", "--grace-s", "1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "bk edge: work queue nowhere of pool branchkey-edge does not exist: create it with "
        "`bk edge setup nowhere=<its credentials JSON> --host <the platform's API>`"]


def test_a_worker_for_a_leaf_without_its_block_names_the_block_and_the_setup_command(platform: Platform) -> None:
    _deploy_rounds(platform, "blockless")
    _api(platform.api, "DELETE", f"/block_documents/{_block_id(platform, 'blockless')}")
    result = _bk(platform, "edge", "worker", "blockless", "--grace-s", "1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "bk edge: credentials Block branchkey-credentials/blockless does not exist: create it with "
        "`bk edge setup blockless=<its credentials JSON> --host <the platform's API>`"]


def _block_id(platform: Platform, name: str) -> str:
    return _api(platform.api, "GET", f"/block_types/slug/branchkey-credentials/block_documents/name/{name}")["id"]


def test_a_run_whose_worker_and_process_died_is_set_crashed_by_the_lost_run_automation(
        platform: Platform, lost_run: LostRun, logs: Logs) -> None:
    logs.paths.extend(lost_run.logs.paths)
    _wait_until(lambda: _state(platform, lost_run.run_id)["state_type"] != "RUNNING", MIN_LOST_RUN_S + 60,
                "the lost-run automation")
    run = _state(platform, lost_run.run_id)
    assert run["state_type"] == "CRASHED" and "No heartbeat" in run["state"]["message"], run["state"]


@dataclass
class TrialServer:
    """`bk dev prefect-server`, started, stopped by SIGTERM and started again on its data: what each step showed."""

    port: int
    first_output: str = ""
    stop_s: float = 0.0
    exit_status: int | None = None
    left_after_stop: list[int] = field(default_factory=list)
    flows_after_restart: list[str] = field(default_factory=list)
    deployments_after_restart: list[str] = field(default_factory=list)
    left_at_the_end: list[int] = field(default_factory=list)


def _start_trial(data: Path, port: int, log: Path, marker: tuple[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", marker[0]: marker[1]}
    process = spawn(["bk", "dev", "prefect-server", "--port", str(port), "--data", str(data)], log, env=env)
    _wait_until(lambda: "export PREFECT_API_URL" in log.read_text() or process.poll() is not None, 180,
                "bk dev prefect-server to answer")
    assert process.poll() is None, log.read_text()
    return process


def _sigterm_and_time(process: subprocess.Popen[bytes]) -> float:
    process.send_signal(signal.SIGTERM)
    return _exit_within(process, 60)


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrialServer]:
    """Start the trial server, register a flow and a deployment, SIGTERM it, start it again on the
    same data and read them back, SIGTERM it again."""
    root = tmp_path_factory.mktemp("trial")
    marker, data, logs = new_marker(), root / "prefect-data", [root / "first-start.log", root / "second-start.log"]
    facts = TrialServer(free_port())
    process = _start_trial(data, facts.port, logs[0], marker)
    try:
        facts.first_output = logs[0].read_text()
        api = f"http://127.0.0.1:{facts.port}/api"
        flow_id = _api(api, "POST", "/flows/", {"name": "trial-flow"})["id"]
        _api(api, "POST", "/deployments/", {"name": "trial-deployment", "flow_id": flow_id})
        facts.stop_s = _sigterm_and_time(process)
        facts.exit_status = process.returncode
        facts.left_after_stop = left_running(marker, timeout=5)
        process = _start_trial(data, facts.port, logs[1], marker)
        facts.flows_after_restart = [f["name"] for f in _api(api, "POST", "/flows/filter", {})]
        facts.deployments_after_restart = [d["name"] for d in _api(api, "POST", "/deployments/filter", {})]
        _sigterm_and_time(process)
        facts.left_at_the_end = left_running(marker, timeout=5)
        yield facts
    except BaseException:
        for log in [*logs, data / "server.log", data / "postgres" / "postgres.log"]:
            print(f"===== {log} =====\n{log.read_text() if log.exists() else '(no log)'}", file=sys.stderr)
        raise
    finally:
        stop_group(process)
        for pid in left_running(marker, timeout=0):
            os.kill(pid, signal.SIGKILL)


def test_dev_prefect_server_prints_the_api_url_of_its_port(trial: TrialServer) -> None:
    assert f"export PREFECT_API_URL=http://127.0.0.1:{trial.port}/api\n" in trial.first_output


def test_dev_prefect_server_stops_on_sigterm_leaving_no_process(trial: TrialServer) -> None:
    print(f"bk dev prefect-server stopped {trial.stop_s:.1f} s after SIGTERM")
    assert trial.exit_status == 0 and trial.left_after_stop == [] and trial.left_at_the_end == []


def test_dev_prefect_server_started_again_on_its_data_keeps_flows_and_deployments(trial: TrialServer) -> None:
    assert "trial-flow" in trial.flows_after_restart
    assert trial.deployments_after_restart == ["trial-deployment"]


def test_dev_prefect_server_on_a_taken_port_says_so_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    marker = new_marker()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(["bk", "dev", "prefect-server", "--port", str(port), "--data", str(tmp_path / "data")],
                                env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", marker[0]: marker[1]},
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line, line
    assert result.stdout == "" and not (tmp_path / "data").exists() and left_running(marker, timeout=0) == []
