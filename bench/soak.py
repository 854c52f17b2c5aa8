"""A year of rounds, compressed: one leaf running hundreds of short rounds, watched for what grows.

One leaf process runs `federated_training` of a small model (``--model-mb``, training a few
milliseconds) for ``--rounds`` rounds in one flow run, against a real bk-server and a Prefect
server on the embedded PostgreSQL, with the retention policy on (keep ``--keep`` updates and
global models, 5 and 5 by default) and its round history compacted past ``--compact-after``
loose row files. Every ``--every`` rounds this process reports: the leaf's work dir on disk
(all of it, and its history), the leaf process's RSS, the time `history_rows` takes to read the
whole history (and its latest 50 rows) from here, the history's files (loose rows + segments),
and the Prefect database's size and its growth per round since the last report. Disk and RSS
should be flat once retention keeps K rounds, the history read well under a second.

Exits 1 when a round did not complete or the history does not hold every round once.

Run from the project root (500 rounds take about 15 minutes; `--quick` is a 30-round smoke run
compacting every 5 rounds, as `make test` runs it):

    .venv/bin/python bench/soak.py
    .venv/bin/python bench/soak.py --rounds 2000 --every 200
    .venv/bin/python bench/soak.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import psutil
from harness import MB, format_table, layer_shapes, machine_summary, progress, temporary_root
from leaf_processes import LeafFederation, add_leaf_run_options, leaf_federation

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.flows.leaf import history
from prefect_branchkey.flows.leaf.history import history_dir, history_files, history_rows
from prefect_branchkey.flows.leaf.retention import RetentionSettings
from prefect_branchkey.flows.participant import Participant, TrainResult

ROUND_TIMEOUT_S = 600
POLL_S = 0.25
LAST = 50


class SmallModel(Participant):
    """A float32 model of `model_mb` MB in two layers; training nudges one element in 64."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}

    def __init__(self, model_mb: float = 1.0, leaf_index: int = 0, leaves: int = 1) -> None:
        rng = np.random.default_rng(leaf_index)
        self.layers = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(model_mb, 2)]

    def parameters(self) -> list[np.ndarray]:
        return self.layers

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        for layer in self.layers:
            layer.reshape(-1)[::64] += np.float32(1e-3)
        return TrainResult(1.0, self.layers)

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"accuracy": float(np.tanh(abs(float(global_model[-1][0]))))}


def leaf_main(spec: dict[str, Any]) -> None:
    """The leaf process: every round in one `federated_training` flow run, the history compacted
    past `compact_after` loose rows (the module setting, lowered for the quick run)."""
    from prefect_branchkey.flows.training import federated_training

    history.COMPACT_AFTER = spec["compact_after"]
    block = BranchKeyCredentials.from_platform_json(spec["credentials"], host=spec["host"])
    keep = spec["keep"]
    results = federated_training(block, f"{SmallModel.__module__}:{SmallModel.__qualname__}", spec["work_dir"],
                                 rounds=spec["rounds"], participant_options=spec["options"],
                                 aggregation_timeout_s=ROUND_TIMEOUT_S, run_timeout_s=ROUND_TIMEOUT_S,
                                 retention=RetentionSettings(keep_updates=keep, keep_models=keep))
    statuses = [r.status for r in results]
    if statuses != ["completed"] * spec["rounds"]:
        raise SystemExit(f"{block.leaf_name}: rounds ended as {sorted(set(statuses))}, {len(statuses)} of them")


def tree_bytes(root: Path) -> int:
    """The bytes of every file under `root` (their sizes; a file deleted meanwhile is skipped)."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total


def prefect_database_bytes(prefect: LocalPrefectServer) -> int:
    """The size of the Prefect server's database on the embedded PostgreSQL (pg_database_size)."""
    if prefect.postgres is None:
        return 0
    return int(prefect.postgres._psql("SELECT pg_database_size('prefect')", database="prefect"))


def timed_read(work_dir: Path, last: int | None) -> float:
    """Seconds `history_rows` takes to read the history (its `last` rows, or all)."""
    started = time.perf_counter()
    history_rows(work_dir, last=last)
    return time.perf_counter() - started


def sample(federation: LeafFederation, name: str, pid: int, rounds: int, before: dict[str, Any]) -> dict[str, Any]:
    """What has grown after `rounds` rounds, against the sample `before`."""
    work_dir = federation.work_dir(name)
    read_s, read_last_s = timed_read(work_dir, None), timed_read(work_dir, LAST)
    try:
        rss: float | None = psutil.Process(pid).memory_info().rss / MB
    except psutil.NoSuchProcess:
        rss = None  # the leaf finished its last round before the sample
    files = sorted(path.name for path in history_dir(work_dir).glob("*.parquet"))
    database = prefect_database_bytes(federation.prefect)
    return {"round": rounds, "disk_mb": tree_bytes(work_dir) / MB,
            "history_kb": tree_bytes(history_dir(work_dir)) / 1e3, "rss_mb": rss,
            "read_s": read_s, "read_last_s": read_last_s, "loose": sum(name.startswith("run-") for name in files),
            "segments": sum(name.startswith(history.SEGMENT_PREFIX) for name in files),
            "db_mb": database / MB,
            "db_kb_per_round": (database - before["db_bytes"]) / 1e3 / max(1, rounds - before["round"]),
            "db_bytes": database}


def row_cells(row: dict[str, Any]) -> list[str]:
    rss = "ended" if row["rss_mb"] is None else f"{row['rss_mb']:.0f}"
    return [str(row["round"]), f"{row['disk_mb']:.1f}", f"{row['history_kb']:.0f}", rss,
            f"{row['read_s']:.3f}", f"{row['read_last_s']:.3f}", f"{row['loose']} + {row['segments']}",
            f"{row['db_mb']:.1f}", f"{row['db_kb_per_round']:.1f}"]


HEADINGS = ["rounds", "work dir MB", "history KB", "leaf RSS MB", "read all s", f"read last {LAST} s",
            "loose + segments", "Prefect DB MB", "DB KB/round"]


def watch(federation: LeafFederation, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sample every `args.every` rounds until the leaf process ends; print each row as it comes."""
    process = federation.processes[0]
    work_dir = federation.work_dir(name)
    before: dict[str, Any] = {"round": 0, "db_bytes": prefect_database_bytes(federation.prefect)}
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + ROUND_TIMEOUT_S * args.rounds
    while time.monotonic() < deadline:
        ended = process.poll() is not None
        done = len(history_files(work_dir)) if history_dir(work_dir).is_dir() else 0
        if done >= before["round"] + args.every or (ended and done > before["round"]):
            before = sample(federation, name, process.pid, done, before)
            samples.append(before)
            progress(f"  round {done}: {json.dumps({k: v if v is None else round(v, 3) for k, v in before.items()})}")
            if not args.json:
                lines = format_table(HEADINGS, [row_cells(before)]).splitlines()
                print("\n".join(lines if len(samples) == 1 else lines[-1:]), flush=True)
        if ended:
            break
        time.sleep(POLL_S)
    return samples


def bench(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    progress("starting the Prefect server (embedded PostgreSQL) and bk-server")
    with leaf_federation(root, 1, "soak") as federation:
        [name] = federation.names
        started = time.monotonic()
        federation.start_leaves(__file__, lambda index: {
            "rounds": args.rounds, "keep": args.keep, "compact_after": args.compact_after,
            "options": {"model_mb": args.model_mb, "leaf_index": index, "leaves": 1}})
        samples = watch(federation, name, args)
        failure = None
        try:
            federation.wait(ROUND_TIMEOUT_S)
        except RuntimeError as exc:
            failure = str(exc)
        wall = time.monotonic() - started
        rows = history_rows(federation.work_dir(name))
    rounds = [row["round"] for row in rows if row["status"] == "completed"]
    return {"samples": samples, "wall_s": wall, "rounds": args.rounds, "completed": len(rounds),
            "every_round_once": rounds == list(range(1, args.rounds + 1)) and len(rows) == args.rounds,
            "failure": failure}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="report every this many rounds (50)")
    parser.add_argument("--model-mb", type=float, default=1.0, help="the model's size in MB (1)")
    parser.add_argument("--keep", type=int, default=5, help="updates and global models the retention keeps (5)")
    parser.add_argument("--compact-after", type=int, default=history.COMPACT_AFTER,
                        help=f"loose history rows before compaction ({history.COMPACT_AFTER})")
    parser.add_argument("--quick", action="store_true", help="30 rounds, a report every 10, compaction past 4 rows")
    add_leaf_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.every, args.compact_after = 30, 10, 4
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.leaf:
        leaf_main(json.loads(args.leaf))
        return
    if not args.json:
        print(machine_summary("prefect", "pyarrow"))
        print(f"# 1 leaf as a process, a {args.model_mb:g} MB model, {args.rounds} rounds in one flow run; retention "
              f"keeps {args.keep} updates and models; history compacted past {args.compact_after} loose rows",
              flush=True)
    with temporary_root(args.workdir, "bk-bench-soak-") as root:
        report = bench(root, args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['completed']} of {args.rounds} rounds completed in {report['wall_s']:.0f} s; every round "
              f"in the history once: {report['every_round_once']}")
    if report["failure"] or not report["every_round_once"]:
        progress(report["failure"] or f"the history holds {report['completed']} completed rounds of {args.rounds}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
