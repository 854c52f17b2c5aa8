"""Benchmark simulated federations on a Dask cluster: `bk simulate` with N leaves, client sampling,
and 1 or 2 worker processes, against a real `bk-server` and a Prefect server on PostgreSQL.

For each (leaves, fraction, workers) of the sweep the script creates a federation whose rounds
close at the drawn number of updates (with a deadline, as `bk simulate` sets it up), writes the
leaves' credentials and runs `bk simulate --host ...` as a child process: a local Dask cluster of
that many worker processes, each drawn leaf's round a Prefect task on it, the digits participant
training for real. The figures:

- ``round p50`` / ``round max``: a round's wall time, from the first drawn leaf's start to the last
  one's end (the leaves' history), over the rounds;
- ``leaf-rounds/s``: completed leaf-rounds over the simulation's whole wall time (cluster start
  included), and ``wall``: that whole time;
- ``worker RSS``: the largest peak resident memory of a Dask worker process; ``platform RSS``: the
  peak of the bk-server process; sampled every 0.2 s;
- ``Prefect share``: the CPU seconds of the Prefect server and its PostgreSQL over the CPU seconds
  of everything the run used (simulation and workers, bk-server, Prefect);
- ``exact``: whether every platform round holds exactly one update per drawn leaf (sampling.json
  against the platform's records).

The table's footnote gives the per-round cost of adding leaves: the slope of ``round p50`` over
the number of drawn leaves (least squares over the rows with one worker count). One machine over
loopback: the leaves, both servers and the cluster share its CPUs. For a multi-machine cluster run
the same `bk simulate` with ``--dask-address tcp://<scheduler>:8786`` and a ``--work-root`` every
worker mounts.

    .venv/bin/python bench/simulation.py --quick          # 10 leaves, fraction 0.3, 2 workers, 3 rounds
    .venv/bin/python bench/simulation.py                  # 10, 30, 100 leaves: the README's table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from harness import (
    BenchServer,
    add_common_options,
    cpu_seconds,
    format_table,
    machine_summary,
    percentile,
    progress,
    temporary_root,
)

from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.federation.sampling import leaves_per_round
from prefect_branchkey.flows.federation.simulation import SAMPLING_FILE
from prefect_branchkey.flows.leaf.history import history_rows

ROUND_DEADLINE_S = 120
SAMPLE_S = 0.2
# Lines of a failed simulation's log shown before the benchmark exits (its directory is removed).
LOG_LINES = 30
PROJECT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One simulation of the sweep."""

    leaves: int
    fraction: float
    workers: int
    drawn: int
    rounds: int
    round_p50: float
    round_max: float
    leaf_rounds_per_s: float
    wall_s: float
    worker_rss_mb: float
    platform_rss_mb: float
    prefect_share: float
    exact: bool


class PeakMemory:
    """Samples the resident memory of a process tree's processes in the background."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots, self.peaks = roots, {name: 0 for name in roots}
        self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for name, pid in self.roots.items():
                try:
                    root = psutil.Process(pid)
                    self.peaks[name] = max(self.peaks[name], root.memory_info().rss)
                    if name == "simulation":
                        workers = [p.memory_info().rss for p in root.children(recursive=True)
                                   if "spawn" in " ".join(p.cmdline())]
                        self.worker_peak = max([self.worker_peak, *workers])
                except psutil.NoSuchProcess:
                    continue


def what_went_wrong(log: Path, most: int = LOG_LINES) -> list[str]:
    """The simulation log's last `most` lines that say what went wrong at the federation's level:
    the flow's warnings and errors (failed leaves, lost Dask workers and their reasons, the
    simulation's own error) and distributed's, not the leaves' routine resync warnings."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    wanted = [line for line in lines if ("| Flow run" in line or "distributed." in line)
              and ("WARNING" in line or "ERROR" in line)]
    return wanted[-most:] or lines[-most:]


def prefect_cpu_seconds(prefect: LocalPrefectServer) -> float:
    """CPU seconds of the Prefect server and of its embedded PostgreSQL (a process of its own)."""
    postgres = prefect.postgres.process if prefect.postgres else None
    return cpu_seconds(prefect.process.pid) + (cpu_seconds(postgres.pid) if postgres else 0.0)


def completed_by_round(work_root: Path, names: Sequence[str]) -> dict[int, list[dict]]:
    """The leaves' completed history rows (with start and end times), by round."""
    by_round: dict[int, list[dict]] = {}
    for name in names:
        for row in history_rows(work_root / name):
            if row["status"] == "completed" and row["started_at"] and row["finished_at"]:
                by_round.setdefault(row["round"], []).append(row)
    return dict(sorted(by_round.items()))


def round_wall(rows: Sequence[dict]) -> float:
    """A round's wall time: the last drawn leaf's end minus the first one's start."""
    return (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()


PHASES = ("train_s", "upload_s", "wait_s", "download_s", "evaluate_s")


def round_breakdown(by_round: dict[int, list[dict]]) -> list[str]:
    """Per round, a progress line: its wall, the spread of the drawn leaves' starts (how long the
    cluster took to start them all) and the median of each step's time, to show where a round's
    time goes and whether later rounds cost more."""
    lines = []
    for number, rows in by_round.items():
        starts = [r["started_at"].timestamp() for r in rows]
        steps = "  ".join(f"{phase[:-2]} {np.median([r[phase] or 0.0 for r in rows]):.2f}" for phase in PHASES)
        lines.append(f"    round {number}: wall {round_wall(rows):.2f} s, starts spread "
                     f"{max(starts) - min(starts):.2f} s, median s: {steps}")
    return lines


def exact_updates(server: BenchServer, branch_id: str, work_root: Path) -> bool:
    """Whether each aggregated platform round holds one update from each leaf drawn for it."""
    drawn = json.loads((work_root / SAMPLING_FILE).read_text())["rounds"]
    rounds = [r for r in server.rounds(branch_id) if r["status"] == "aggregated"]
    leaf_ids = {json.loads(path.read_text())["id"]: path.stem
                for path in (work_root.parent / "credentials").glob("*.json")}
    return len(rounds) == len(drawn) and all(
        r["updates"] == plan["leaves"]
        and sorted(leaf_ids[i] for i in r["leaves"]) == sorted(plan["chosen"].split(", "))
        for r, plan in zip(rounds, drawn, strict=True))


def bench_one(prefect: LocalPrefectServer, server: BenchServer, root: Path, leaves: int, fraction: float,
              workers: int, rounds: int) -> Row:
    """Run one simulation and measure it."""
    drawn = leaves_per_round(leaves, fraction)
    name = f"sim-{leaves}-{fraction:g}-{workers}".replace(".", "p")
    federation = server.create_federation(leaves, tree=name, branch=name, min_updates=drawn, quorum=1,
                                          round_deadline_s=ROUND_DEADLINE_S)
    run_dir = root / name
    write_credentials(run_dir / "credentials", federation["leaves"])
    command = [sys.executable, "-m", "prefect_branchkey.deployments.cli", "simulate", "--host", server.url,
               "--credentials-dir", str(run_dir / "credentials"), "--work-root", str(run_dir / "leaves"),
               "--rounds", str(rounds), "--fraction", str(fraction), "--workers", str(workers),
               "--aggregation-timeout-s", "600"]
    progress(f"{leaves} leaves, fraction {fraction:g} ({drawn} per round), {workers} worker(s): {rounds} rounds")
    env = prefect.client_env() | {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"}
    cpu_before = {"prefect": prefect_cpu_seconds(prefect), "platform": cpu_seconds(server.process.pid)}
    started = time.perf_counter()
    with open(run_dir / "simulation.log", "wb") as log:
        child = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory({"simulation": child.pid, "platform": server.process.pid}) as memory:
            child_cpu = 0.0
            while child.poll() is None:
                child_cpu = max(child_cpu, cpu_seconds(child.pid))
                time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        for line in what_went_wrong(run_dir / "simulation.log"):
            progress(f"    {line}")
        raise SystemExit(f"bk simulate failed (exit {child.returncode}): its flow-level warnings and errors above "
                         "(the log goes with the temporary directory)")
    prefect_cpu = prefect_cpu_seconds(prefect) - cpu_before["prefect"]
    platform_cpu = cpu_seconds(server.process.pid) - cpu_before["platform"]
    names = [leaf["name"] for leaf in federation["leaves"]]
    by_round = completed_by_round(run_dir / "leaves", names)
    walls = [round_wall(rows) for rows in by_round.values()]
    for line in round_breakdown(by_round):
        progress(line)
    completed = sum(len(rows) for rows in by_round.values())
    return Row(leaves, fraction, workers, drawn, rounds, percentile(walls, 50), max(walls), completed / wall, wall,
               memory.worker_peak / 1e6, memory.peaks["platform"] / 1e6,
               prefect_cpu / max(prefect_cpu + platform_cpu + child_cpu, 1e-9),
               exact_updates(server, federation["branch_id"], run_dir / "leaves"))


def slope(rows: Sequence[Row]) -> float | None:
    """Seconds a round's p50 grows per drawn leaf (least squares), over rows of one worker count."""
    if len({r.drawn for r in rows}) < 2:
        return None
    return float(np.polyfit([r.drawn for r in rows], [r.round_p50 for r in rows], 1)[0])


def table(rows: Sequence[Row]) -> str:
    headings = ["leaves", "fraction", "drawn", "workers", "round p50", "round max", "leaf-rounds/s", "wall",
                "worker RSS", "platform RSS", "Prefect share", "exact"]
    cells = [[str(r.leaves), f"{r.fraction:g}", str(r.drawn), str(r.workers), f"{r.round_p50:.2f} s",
              f"{r.round_max:.2f} s", f"{r.leaf_rounds_per_s:.2f}", f"{r.wall_s:.0f} s", f"{r.worker_rss_mb:.0f} MB",
              f"{r.platform_rss_mb:.0f} MB", f"{100 * r.prefect_share:.0f} %", "yes" if r.exact else "NO"]
             for r in rows]
    notes = []
    for workers in sorted({r.workers for r in rows}):
        grown = slope([r for r in rows if r.workers == workers])
        if grown is not None:
            notes.append(f"{workers} worker(s): a round's p50 grows {grown:.3f} s per drawn leaf")
    return format_table(headings, cells) + ("\n" + "\n".join(notes) if notes else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_options(parser, "sampling", "10 leaves, fraction 0.3, 2 workers, 3 rounds: a smoke run",
                       "print the rows as JSON instead of the table")
    parser.add_argument("--leaves", default="10,30,100", help="leaf counts to sweep (comma-separated)")
    parser.add_argument("--fractions", default="1.0,0.3", help="sampling fractions to sweep")
    parser.add_argument("--workers", default="1,2", help="local cluster sizes to sweep")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    leaf_counts = [10] if args.quick else [int(n) for n in args.leaves.split(",")]
    fractions = [0.3] if args.quick else [float(f) for f in args.fractions.split(",")]
    worker_counts = [2] if args.quick else [int(w) for w in args.workers.split(",")]
    rounds = 3 if args.quick else args.rounds
    rows: list[Row] = []
    with temporary_root(args.workdir, "bench-simulation-") as root:
        os.environ["PREFECT_HOME"] = str(root / "prefect-home")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        with LocalPrefectServer(root / "prefect", database="postgres") as prefect:
            server = BenchServer(root / "platform").start()
            try:
                for leaves in leaf_counts:
                    for fraction in fractions:
                        for workers in worker_counts:
                            rows.append(bench_one(prefect, server, root, leaves, fraction, workers, rounds))
                            progress(f"  {rows[-1]}")
            finally:
                server.stop()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print(machine_summary("prefect", "distributed", "prefect-dask"))
        print(table(rows))
    if not all(row.exact for row in rows):
        progress("a platform round did not hold exactly one update per drawn leaf: the figures above are not "
                 "of the federation asked for")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
