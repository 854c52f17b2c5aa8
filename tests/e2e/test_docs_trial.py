"""docs/edge-workers.md's trial on one machine, run as written: each `<!-- trial: NAME -->` block
of the doc in a shell of its own (a terminal), from the checkout, at the ports the doc names.
The servers and workers run in the background as a user's terminals would; the set-up and the
rounds run to their end, each command timed. What the doc promises is checked: every leaf's
triggered and scheduled rounds, the federation's dashboard built by its automation, workers
that SIGTERM stops within the documented bound leaving no run Running, and a server that Ctrl-C
stops leaving no process behind. The one timer shortened is the Prefect scheduler's loop (60 s
to 5 s), so that the doc's one-minute schedule starts its first round within a minute.

The doc's ports (4200, 8080) and directory (`./trial` in the checkout) are fixed, so this test
refuses to run, naming them, when one is taken. A failing run prints every terminal's output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_branchkey.bk_dev.processes import spawn, stop_group
from prefect_branchkey.deployments.worker import DEFAULT_GRACE_S, stop_bound_s
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.publishing.observability import artifact_key

from ..support.flow_helpers import artifacts
from ..support.http import LOCAL
from ..support.process_helpers import left_running, new_marker

pytestmark = [pytest.mark.e2e]

PROJECT = Path(__file__).resolve().parents[2]
DOC = PROJECT / "docs" / "edge-workers.md"
TRIAL = PROJECT / "trial"
API = "http://127.0.0.1:4200/api"
PLATFORM = "http://127.0.0.1:8080"
LEAVES = ("digits-leaf-1", "digits-leaf-2", "digits-leaf-3")
WORKERS = ("worker-1", "worker-2", "worker-3")
# The rounds of the doc's triggered runs; its schedule adds one every minute after them.
ROUNDS = 2
# A worker stopped mid-round lets the run finish for its grace; docs/edge-workers.md bounds its stop.
WORKER_STOP_BOUND_S = stop_bound_s(DEFAULT_GRACE_S)
# The trial server, then its PostgreSQL.
SERVER_STOP_BOUND_S = 60
ACTIVE = {"PENDING", "RUNNING", "CANCELLING"}
# `<!-- trial: NAME -->` opens a terminal; `<!-- trial: NAME (in OTHER's terminal) -->` goes on in
# OTHER's, with the environment its block left.
MARKER = re.compile(r"^<!-- trial: ([\w-]+)(?: \(in ([\w-]+)'s terminal\))? -->$")


def trial_blocks(text: str) -> dict[str, tuple[str, str | None]]:
    """Each marked block of the doc: its indented lines after the marker, unindented, and the
    block whose terminal it goes on in (None: its own)."""
    blocks: dict[str, tuple[str, str | None]] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines):
        found = MARKER.match(line.strip())
        if not found:
            continue
        body: list[str] = []
        for following in lines[number + 1:]:
            if following.startswith("    "):
                body.append(following[4:])
            elif following.strip() or body:
                break
        assert found.group(1) not in blocks, f"two blocks named {found.group(1)!r}"
        assert not any(line.rstrip().endswith(("\\", "&&", "|")) for line in body), \
            f"block {found.group(1)!r}: one command per line, so that each can be run and timed alone"
        blocks[found.group(1)] = ("\n".join(body), found.group(2))
    return blocks


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _answers(url: str) -> bool:
    try:
        return LOCAL.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _api(method: str, path: str, body: Any = None) -> Any:
    response = LOCAL.request(method, f"{API}{path}", json=body)
    response.raise_for_status()
    return response.json()


def _flow_runs() -> list[dict[str, Any]]:
    """Every run past Scheduled: the one-minute schedules keep an hour of runs (about 60 a leaf)
    scheduled ahead, more than a page of the API holds."""
    return _api("POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
                                              "limit": 200})


def _wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _scheduled_rounds_completed() -> set[str]:
    """The leaves with a scheduled round (a run of their rounds deployment, made by its schedule) completed."""
    return {r["name"].split("-round-")[0] for r in _flow_runs()
            if r["auto_scheduled"] and r["state_type"] == "COMPLETED" and "-round-" in r["name"]}


def _dashboard_rounds() -> list[int]:
    versions = artifacts(API, artifact_key("federation", "digits"))
    return [row["round"] for row in json.loads(versions[0]["data"]) if row["missing"] == "-"] if versions else []


class Terminals:
    """The doc's terminals: background shells, one log each, all printed when the test fails."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, block: tuple[str, str | None]) -> subprocess.Popen[bytes]:
        """Start a block that runs until its Ctrl-C (a server, a worker) in a terminal of its own."""
        assert block[1] is None, f"{name} must open a terminal of its own"
        self.running[name] = spawn(["bash", "-e", "-c", block[0]], self.logs / f"{name}.log", env=self.env,
                                   cwd=PROJECT)
        return self.running[name]

    def run(self, name: str, block: str, terminal_of: str | None = None) -> None:
        """Run a block to its end, as pasted into a terminal (`terminal_of`'s, with the environment
        that block left); a failing command ends it."""
        before = f". {shlex.quote(str(self.logs / f'{terminal_of}.env'))}\n" if terminal_of else ""
        timings = shlex.quote(str(self.logs / f"{name}.timings"))
        timed = "\n".join(f"__began=$EPOCHREALTIME\n{line}\nprintf '%s\\t%s\\t%s\\n' \"$__began\" \"$EPOCHREALTIME\" "
                          f"{shlex.quote(line)} >> {timings}" for line in block.splitlines())
        carried = shlex.quote(str(self.logs / f"{name}.env"))
        script = f"{before}{timed}\nexport -p | grep -v -e ' SHELLOPTS=' -e ' BASHOPTS=' > {carried}"
        result = subprocess.run(["bash", "-e", "-c", script], cwd=PROJECT, env=self.env, capture_output=True,
                                text=True, timeout=600, stdin=subprocess.DEVNULL)
        (self.logs / f"{name}.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, f"the doc's block {name!r} failed:\n{block}\n{result.stdout}\n{result.stderr}"

    def stop(self, sig: signal.Signals, bound_s: float, *names: str) -> dict[str, tuple[int | None, float]]:
        """`sig` to each terminal's process group at once (SIGINT: Ctrl-C): each one's exit status
        (None: still running `bound_s` after the signal) and seconds to exit."""
        began = time.monotonic()
        for name in names:
            os.killpg(self.running[name].pid, sig)
        ended: dict[str, tuple[int | None, float]] = {}
        for name in names:
            try:
                status: int | None = self.running[name].wait(timeout=max(bound_s - (time.monotonic() - began), 0))
            except subprocess.TimeoutExpired:
                status = None
            ended[name] = (status, time.monotonic() - began)
        return ended

    def timings(self) -> list[tuple[str, float]]:
        """Each command the blocks ran to their end, with its seconds."""
        lines = [line.split("\t", 2) for path in sorted(self.logs.glob("*.timings"))
                 for line in path.read_text().splitlines()]
        return [(command, float(end) - float(start)) for start, end, command in lines]

    def story(self) -> str:
        return "\n".join(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        for process in self.running.values():
            stop_group(process, timeout=SERVER_STOP_BOUND_S)


@pytest.fixture
def terminals(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Terminals]:
    """The doc's terminals, with the environment a user's shell has in the checkout (Prefect
    kept offline in its own home); the trial directory removed afterwards."""
    taken = [port for port in (4200, 8080) if not _port_free(port)]
    if taken or TRIAL.exists():
        pytest.fail(f"the doc's trial needs ports 4200 and 8080 free (taken: {taken}) and no {TRIAL}")
    marker = new_marker()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", marker[0]: marker[1]}
    env.pop("PREFECT_API_URL", None)
    opened = Terminals(env, tmp_path)
    failed_before = request.session.testsfailed
    try:
        yield opened
    finally:
        opened.close()
        if request.session.testsfailed > failed_before:
            print(opened.story())
        shutil.rmtree(TRIAL, ignore_errors=True)
    assert left_running(marker) == [], "processes of the trial outlived their terminals"


def test_the_docs_trial_runs_as_written_and_stops_cleanly(terminals: Terminals) -> None:
    blocks = trial_blocks(DOC.read_text())
    assert set(blocks) == {"prefect-server", "platform", "setup", *WORKERS, "rounds"}, sorted(blocks)
    terminals.start("prefect-server", blocks["prefect-server"])
    terminals.start("platform", blocks["platform"])
    _wait_until(lambda: _answers(f"{API}/health") and _answers(f"{PLATFORM}/healthz"), 180,
                f"the Prefect server and the platform to answer\n{terminals.story()}")
    terminals.run("setup", *blocks["setup"])
    for worker in WORKERS:
        terminals.start(worker, blocks[worker])
    terminals.run("rounds", *blocks["rounds"])

    def trained() -> bool:
        runs = [r for r in _flow_runs() if r["name"].endswith("-training")]
        return len(runs) == len(LEAVES) and all(r["state_type"] in {"COMPLETED", "FAILED", "CRASHED"} for r in runs)

    _wait_until(trained, 300, f"every leaf's training run to end\n{terminals.story()}")
    runs = {r["name"]: r["state_type"] for r in _flow_runs() if r["name"].endswith("-training")}
    assert runs == {f"{leaf}-training": "COMPLETED" for leaf in LEAVES}, terminals.story()
    _wait_until(lambda: _scheduled_rounds_completed() == set(LEAVES), 300,
                f"a scheduled round of every leaf\n{terminals.story()}")
    expected = list(range(1, ROUNDS + 2))
    for leaf in LEAVES:
        assert [row["round"] for row in history_rows(TRIAL / "leaves" / leaf)][:ROUNDS + 1] == expected
    _wait_until(lambda: _dashboard_rounds()[:ROUNDS + 1] == expected, 240,
                f"the federation's dashboard to show rounds {expected}\n{terminals.story()}")

    stops = terminals.stop(signal.SIGTERM, WORKER_STOP_BOUND_S, *WORKERS)
    assert {worker: status for worker, (status, _) in stops.items()} == dict.fromkeys(WORKERS, 0), terminals.story()
    assert [r["name"] for r in _flow_runs() if r["state_type"] in ACTIVE] == []
    ((status, _),) = terminals.stop(signal.SIGINT, SERVER_STOP_BOUND_S, "prefect-server").values()
    assert status == 0, terminals.story()
    print("\n".join(f"{seconds:6.1f} s  {command}" for command, seconds in terminals.timings()))
    print("SIGTERM to exit: " + ", ".join(f"{worker} {seconds:.1f} s" for worker, (_, seconds) in stops.items()))
