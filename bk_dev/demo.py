"""The demo federation (`make demo`): a local platform, a Prefect server with its UI, and
three leaves learning handwritten digits together for ten rounds, after a statistics round
that pools the per-pixel mean and std of their training images (no raw pixel leaves a leaf).

Starts `bk-server` (WebSocket notifications; AMQP when `BK_DEMO_TRANSPORT=amqp` and a
RabbitMQ broker answers on 127.0.0.1) and `prefect server start`, each on a free port and
in a directory of its own under `demo-data/`, so a rerun never clashes with an earlier one.
The leaves run as one `federated-simulation` flow run (`bk simulate`, a process of its
own) while a progress display follows their round history; at the end the demo prints
the per-round accuracy and the Prefect UI pages that show it, and keeps the servers up
until Ctrl-C (or exits at once with `--no-keep`). Ctrl-C at any moment stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from prefect_branchkey.bk_dev.local_platform import LocalServer
from prefect_branchkey.bk_dev.prefect_database import PrefectDatabaseError
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer, default_database, describe_database
from prefect_branchkey.bk_dev.processes import broker_available, spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.federation.sampling import SamplingError, leaves_per_round
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.publishing.assets import MATERIALIZED, global_model_asset
from prefect_branchkey.flows.publishing.observability import artifact_key, federation_table, primary_metric, sparkline

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REFRESH_S = 0.5
# A demo round takes seconds; should a leaf fail, the others give up on its round after this.
AGGREGATION_TIMEOUT_S = 120
# The demo federation's branch name (its federation artifacts are keyed by it).
DEMO_BRANCH = "digits"
# With client sampling, the platform closes a round this long after it opened (with one update in).
SAMPLED_DEADLINE_S = 120
# The final history shows every leaf's column up to this many leaves, the mean only beyond.
MAX_LEAF_COLUMNS = 6


def choose_transport(requested: str | None) -> tuple[str, str | None]:
    """The transport to use, and a note when AMQP was asked for but no broker answers."""
    wanted = (requested or "websocket").strip().lower()
    if wanted not in ("websocket", "amqp"):
        raise SystemExit(f"BK_DEMO_TRANSPORT must be websocket or amqp, got {requested!r}")
    if wanted == "amqp" and not broker_available():
        return "websocket", "no RabbitMQ on 127.0.0.1:5672 (with its management API on 15672): using WebSocket"
    return wanted, None


def new_run_dir(base: Path) -> Path:
    """A fresh directory for this run's servers, credentials and leaves."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{n}" for n in range(2, 100))):
        path = base / f"{stamp}{suffix}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise SystemExit(f"cannot make a run directory under {base}")


def leaf_histories(leaves_dir: Path, names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each leaf's recorded rounds so far (empty for a leaf that has recorded none)."""
    return {name: history_rows(leaves_dir / name) for name in names}


def progress_view(histories: Mapping[str, Sequence[dict[str, Any]]], rounds: int) -> Table:
    """Where the federation is: the round, leaves done with it, and each leaf's latest accuracy."""
    done = {leaf: len(rows) for leaf, rows in histories.items()}
    current = min(min(done.values()) + 1, rounds)
    finished = sum(count >= current for count in done.values())
    table = Table(title=f"Round {current} of {rounds}: {finished} of {len(done)} leaves done", title_justify="left")
    for column in ("leaf", "rounds", "global model accuracy", "trend"):
        table.add_column(column)
    for leaf, rows in histories.items():
        accuracy = [r["eval_metrics"].get("accuracy") for r in rows if "accuracy" in r["eval_metrics"]]
        table.add_row(leaf, f"{done[leaf]}/{rounds}", f"{accuracy[-1]:.3f}" if accuracy else "-",
                      sparkline(accuracy))
    return table


def follow(console: Console, simulation: subprocess.Popen[bytes], leaves_dir: Path, names: Sequence[str],
           rounds: int, per_round: int) -> int:
    """Show progress until the simulation process ends; return its exit code."""
    if console.is_terminal:
        with Live(progress_view(leaf_histories(leaves_dir, names), rounds), console=console,
                  refresh_per_second=4) as live:
            while simulation.poll() is None:
                time.sleep(REFRESH_S)
                live.update(progress_view(leaf_histories(leaves_dir, names), rounds))
            live.update(progress_view(leaf_histories(leaves_dir, names), rounds))
        return simulation.returncode
    printed = 0
    while True:
        running = simulation.poll() is None
        table = federation_table(leaf_histories(leaves_dir, names))
        for index, row in enumerate(table[printed:], start=printed):
            # A round is over once its drawn leaves all reported, a later round began, or the run ended.
            if row["leaves"] < per_round and index == len(table) - 1 and running:
                break
            console.print(round_line(row, rounds, per_round, len(names)))
            printed += 1
        if not running:
            return simulation.returncode
        time.sleep(REFRESH_S)


def round_line(row: Mapping[str, Any], rounds: int, per_round: int, leaves: int) -> str:
    """A finished round for the log: who reported it and the mean accuracy."""
    if row["leaves"] >= per_round:
        who = "every leaf" if per_round == leaves else f"its {per_round} drawn leaves"
    else:
        who = f"{row['leaves']} of its {per_round} drawn leaves (the others failed or sat it out)"
    mean = row.get("mean accuracy")
    accuracy = f", mean global model accuracy {mean:.3f}" if mean is not None else ""
    return f"round {row['round']} of {rounds} done by {who}{accuracy}"


def history_view(histories: Mapping[str, Sequence[dict[str, Any]]]) -> Table:
    """The per-round history: every leaf's global-model accuracy side by side, and the mean."""
    names = sorted({m for rows in histories.values() for r in rows for m in r["eval_metrics"]})
    metric = primary_metric(names) or "accuracy"
    table = Table(title=f"Global model {metric} per round, as each leaf measured it on its own test data",
                  title_justify="left")
    table.add_column("round")
    shown = list(histories) if len(histories) <= MAX_LEAF_COLUMNS else []
    for leaf in shown:
        table.add_column(leaf)
    if not shown:
        table.add_column("leaves reported")
    table.add_column("mean")
    epsilons = round_epsilons(histories)
    if epsilons:
        table.add_column("epsilon (largest leaf's)")
    for row in federation_table(histories):
        cells = [row.get(f"{leaf} {metric}") for leaf in shown] + [row.get(f"mean {metric}")]
        extra = [f"{epsilons[row['round']]:.2f}" if row["round"] in epsilons else "-"] if epsilons else []
        reported = [] if shown else [str(row["leaves"])]
        table.add_row(str(row["round"]), *reported, *(f"{c:.3f}" if c is not None else "-" for c in cells), *extra)
    return table


def round_epsilons(histories: Mapping[str, Sequence[dict[str, Any]]]) -> dict[int, float]:
    """With DP on: per round, the largest cumulative epsilon of any leaf after it."""
    epsilons: dict[int, float] = {}
    for rows in histories.values():
        for row in rows:
            if row.get("dp_epsilon") is not None:
                epsilons[row["round"]] = max(epsilons.get(row["round"], 0.0), row["dp_epsilon"])
    return epsilons


def latest_artifact_id(api: str, key: str) -> str | None:
    """The id of the newest version of the artifact with this key."""
    response = httpx.post(f"{api}/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
    response.raise_for_status()
    found = response.json()
    return found[0]["id"] if found else None


def latest_event_page(ui: str, api: str, name: str, resource_id: str) -> str | None:
    """The UI page of the newest event of this name about this resource."""
    response = httpx.post(f"{api}/events/filter", timeout=30, json={
        "filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]},
                   "occurred": {"since": "2000-01-01T00:00:00Z"}, "order": "DESC"}, "limit": 1})
    response.raise_for_status()
    found = response.json()["events"]
    return f"{ui}/events/event/{found[0]['occurred'][:10]}/{found[0]['id']}" if found else None


def dashboard_urls(ui: str, api: str, federation: dict[str, Any], names: Sequence[str]) -> dict[str, str]:
    """The Prefect UI pages that show the federation (found by its branch's name): its history
    table, summary, each leaf's history and summary (with its best round), and the latest
    materialization of the global model asset (its upstream updates: the lineage)."""
    keys = {"federation history (every leaf per round)": artifact_key("federation", DEMO_BRANCH),
            "federation summary (accuracy chart)": artifact_key("federation-summary", DEMO_BRANCH)}
    keys.update({f"{leaf} history": artifact_key("history", leaf) for leaf in names[:MAX_LEAF_COLUMNS]})
    keys.update({f"{leaf} summary (best round)": artifact_key("summary", leaf) for leaf in names[:1]})
    urls = {label: f"{ui}/artifacts/artifact/{artifact_id}" for label, key in keys.items()
            if (artifact_id := latest_artifact_id(api, key))}
    asset = global_model_asset(federation["tree_id"], federation["branch_id"]).key
    if page := latest_event_page(ui, api, MATERIALIZED, asset):
        urls["global model asset (latest materialization and its upstream updates)"] = page
    urls["flow runs (filter by the leaf:/branch: tags)"] = f"{ui}/runs"
    return urls


def statistics_view(table: Sequence[Mapping[str, Any]], statistic: str) -> Table:
    """One of the federation's per-pixel statistics from the statistics round, laid out as the 8x8 image."""
    cells = {row["column"]: f"{row[statistic]:.2f}" for row in table}
    side = 8
    view = Table(title=f"Per-pixel {statistic} over the {table[0]['n']} training images of every leaf",
                 title_justify="left")
    for column in range(side):
        view.add_column(str(column))
    for row in range(side):
        view.add_row(*(cells.get(f"pixel_{row * side + column:02d}", "-") for column in range(side)))
    return view


def run_statistics(console: Console, platform: LocalServer, prefect: LocalPrefectServer, run_dir: Path,
                   branch_id: str, transport: str, children: list[subprocess.Popen[bytes]]) -> None:
    """The statistics round (`bk statistics`, every leaf at once, its process added to `children`)
    in run 1, printed; then a new run for training, so the training rounds count from 1."""
    output = run_dir / "statistics.json"
    process = spawn([sys.executable, "-m", "prefect_branchkey.deployments.cli", "statistics", "--host", platform.url,
                     "--credentials-dir", str(run_dir / "credentials"), "--work-root", str(run_dir / "leaves"),
                     "--transport", transport, "--amqp-host", "127.0.0.1", "--timeout-s", str(AGGREGATION_TIMEOUT_S),
                     "--output", str(output)], run_dir / "statistics.log", env=prefect.client_env())
    children.append(process)
    while process.poll() is None:
        time.sleep(REFRESH_S)
    if process.returncode != 0:
        raise StatisticsFailed(f"the statistics round failed (exit {process.returncode}); see "
                               f"{run_dir / 'statistics.log'}")
    table = next(iter(json.loads(output.read_text()).values()))
    console.print("Statistics round done: each leaf sent six numbers per pixel (count, sum, sum of squares, "
                  "min, max, NaN count), no raw pixel; pixel values are 0..1.")
    for statistic in ("mean", "std"):
        console.print(statistics_view(table, statistic))
    platform.run(branch_id, "stop")
    platform.run(branch_id, "start")


class StatisticsFailed(RuntimeError):
    """The demo's statistics round did not complete."""


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops the demo as Ctrl-C does (SIGINT is handled even when a shell started the demo
    in the background, which would otherwise leave it ignored)."""
    raise KeyboardInterrupt


def dp_arguments(dp: Sequence[float] | None) -> list[str]:
    """`bk simulate`'s DP options for `--dp CLIP_NORM NOISE_MULTIPLIER` (none without it)."""
    return [] if dp is None else ["--dp-clip-norm", str(dp[0]), "--dp-noise-multiplier", str(dp[1])]


def round_rules(leaves: int, per_round: int, deadline_s: float | None) -> dict[str, Any]:
    """The branch's round rules: close at `per_round` updates; with sampling (or a deadline
    asked for), also at the deadline with one update in."""
    if per_round == leaves and deadline_s is None:
        return {"min_updates": per_round}
    return {"min_updates": per_round, "quorum": 1, "round_deadline_s": deadline_s or SAMPLED_DEADLINE_S}


def dask_arguments(args: argparse.Namespace) -> list[str]:
    """`bk simulate`'s sampling and Dask options."""
    extra = ["--fraction", str(args.fraction), "--seed", str(args.seed)]
    if args.dask_address:
        extra += ["--dask-address", args.dask_address]
    if args.workers is not None:
        extra += ["--workers", str(args.workers)]
    return extra


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where runs keep their files")
    parser.add_argument("--leaves", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--transport", choices=("websocket", "amqp"), default=os.environ.get("BK_DEMO_TRANSPORT"),
                        help="notifications; default: $BK_DEMO_TRANSPORT, else websocket")
    parser.add_argument("--prefect-db", default=default_database(), metavar="postgres|sqlite|URL",
                        help="the Prefect server's database: postgres (an embedded PostgreSQL in the run's directory, "
                             "the default), sqlite, or a database URL (default: $PREFECT_API_DATABASE_CONNECTION_URL "
                             "if set, else postgres)")
    parser.add_argument("--no-keep", dest="keep", action="store_false", help="stop the servers at the end")
    parser.add_argument("--no-statistics", dest="statistics", action="store_false",
                        help="no statistics round before training (there is none with client sampling: it needs "
                             "every leaf)")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="the fraction of leaves drawn for each round (client sampling), e.g. 0.3")
    parser.add_argument("--seed", type=int, default=0, help="the seed the leaves of each round are drawn from")
    parser.add_argument("--round-deadline-s", type=float, default=None,
                        help="the platform closes a round this long after it opened with the updates in (default "
                             f"with sampling: {SAMPLED_DEADLINE_S:d} s, so a failed leaf cannot stall the federation)")
    parser.add_argument("--dask-address", help="run the leaves on the Dask cluster at this address "
                                               "(default: a local cluster, one worker process per core)")
    parser.add_argument("--workers", type=int, help="worker processes of the local Dask cluster")
    parser.add_argument("--dp", nargs=2, type=float, metavar=("CLIP_NORM", "NOISE_MULTIPLIER"),
                        help="client-side differential privacy on every leaf: clip each update's delta to CLIP_NORM "
                             "and add Gaussian noise of NOISE_MULTIPLIER clip norms (e.g. --dp 1.0 0.3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    console = Console()
    try:
        per_round = leaves_per_round(args.leaves, args.fraction)
    except SamplingError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    transport, note = choose_transport(args.transport)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    run_dir = new_run_dir(args.dir)
    prefect = LocalPrefectServer(run_dir / "prefect", database=args.prefect_db)
    platform = LocalServer(run_dir / "platform" / "data", amqp_url=AMQP_URL if transport == "amqp" else None)
    simulation: subprocess.Popen[bytes] | None = None
    children: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        prefect.launch()
        platform.start()
        federation = platform.create_federation(args.leaves, tree="demo", branch=DEMO_BRANCH,
                                                **round_rules(args.leaves, per_round, args.round_deadline_s))
        names = [leaf["name"] for leaf in federation["leaves"]]
        write_credentials(run_dir / "credentials", federation["leaves"])
        console.print(f"Demo in {run_dir}: bk-server on {platform.url} ({transport} notifications), "
                      f"{args.leaves} leaves; Prefect server on {prefect.url} "
                      f"({describe_database(args.prefect_db)}) starting ...")
        prefect.wait_ready()
        if args.statistics and per_round == args.leaves:
            console.print(f"Prefect server up after {time.monotonic() - started:.0f} s; a statistics round first:")
            run_statistics(console, platform, prefect, run_dir, federation["branch_id"], transport, children)
        else:
            console.print(f"Prefect server up after {time.monotonic() - started:.0f} s.")
        console.print(f"{args.rounds} rounds of federated digits:")
        simulation = spawn([sys.executable, "-m", "prefect_branchkey.deployments.cli", "simulate",
                            "--host", platform.url, "--credentials-dir", str(run_dir / "credentials"),
                            "--work-root", str(run_dir / "leaves"), "--rounds", str(args.rounds),
                            "--transport", transport, "--amqp-host", "127.0.0.1",
                            "--aggregation-timeout-s", str(AGGREGATION_TIMEOUT_S), *dp_arguments(args.dp),
                            *dask_arguments(args)],
                           run_dir / "simulation.log", env=prefect.client_env())
        code = follow(console, simulation, run_dir / "leaves", names, args.rounds, per_round)
        console.print(history_view(leaf_histories(run_dir / "leaves", names)))
        if code != 0:
            console.print(f"[red]The federation failed (exit {code}); see {run_dir / 'simulation.log'}[/red]")
            return 1
        console.print(f"{args.rounds} rounds in {time.monotonic() - started:.0f} s. The dashboard, in the Prefect UI:")
        for label, url in dashboard_urls(prefect.url, prefect.api_url, federation, names).items():
            console.print(f"  {label}: {url}", soft_wrap=True)
        if args.keep:
            console.print("The servers stay up for the UI; Ctrl-C stops them.")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        console.print("Stopping the demo ...")
        return 130
    except (PrefectDatabaseError, StatisticsFailed) as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for child in [*children, *([simulation] if simulation is not None else [])]:
                stop_group(child)
        finally:
            try:
                platform.stop()
            finally:
                prefect.stop()


if __name__ == "__main__":
    sys.exit(main())
