"""`bk`: the leaf-side command line: `bk history` (a work dir's round history), `bk audit` (its
audit trail: `prefect_branchkey.deployments.audit_cli`), `bk simulate`
(a whole federation on a Dask cluster), `bk statistics` (a whole federation's statistics round),
`bk edge` (deployments to edge workers) and `bk dev` (the development platform: a trial Prefect
server).

Of the product, only this module starts the development platform (`prefect_branchkey.bk_dev`,
the `dev` extra): `bk simulate` without `--host` and `bk dev prefect-server`, each importing it
only when run, so `bk` works on an edge machine without that extra."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn

from cyclopts import App
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from prefect_branchkey.bk_blocks.errors import BranchKeyError, MissingExtraError, UsageError
from prefect_branchkey.deployments.audit_cli import app as audit_app
from prefect_branchkey.deployments.edge_cli import app as edge_app
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.participant import ParticipantError, parse_options
from prefect_branchkey.flows.statistics import federation_statistics
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdateSettings, settings_error

app = App(name="bk", help="prefect-branchkey, leaf side.")
app.command(edge_app)
app.command(audit_app)
dev_app = App(name="dev", help="The development platform on this machine (needs the `dev` extra).")
app.command(dev_app)
COLUMNS = ("run_number", "round", "status", "leaf_name", "aggregation_id", "weighting", "round_s", "wait_s",
           "bytes_up", "bytes_down", "update_norm", "upload_precision", "dp_epsilon", "dp_delta", "clip_norm",
           "noise_multiplier", "primary_metric", "best_round", "metric_drop", "metric_drop_alert", "served",
           "finished_at")
# Without --host, `bk simulate`'s local platform closes a round this long after it opened, with the
# updates it has: a drawn leaf that fails or sits a round out cannot stall the federation.
LOCAL_ROUND_DEADLINE_S = 120
# Per-deployment settings a history row records: the table says them once when they never changed.
SETTINGS = ("upload_precision", "dp_delta", "clip_norm", "noise_multiplier", "primary_metric", "metric_drop_alert")


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat = {column: row[column] for column in COLUMNS}
    flat.update({f"eval_{k}": v for k, v in sorted(row["eval_metrics"].items())})
    flat.update({f"train_{k}": v for k, v in sorted(row["train_metrics"].items())})
    flat["finished_at"] = row["finished_at"].isoformat() if row["finished_at"] else None
    return flat


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command
def history(*, work_dir: Path = Path("."), format: Literal["table", "csv", "json"] = "table") -> None:
    """Print the round history recorded in WORK_DIR (a leaf's work directory).

    Parameters
    ----------
    work_dir
        The leaf's work directory (the flows' `work_dir`).
    format
        table (for people), csv or json (for tools).
    """
    rows = [_flatten(row) for row in history_rows(work_dir)]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or list(COLUMNS)
    if format == "json":
        print(json.dumps(rows, indent=2))
    elif format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(work_dir, rows, columns)


def _print_table(work_dir: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """The history for people: one column per per-round value; the settings that were the same
    in every round (upload precision, DP clip norm, noise multiplier, delta, the primary metric
    and its alert) said once below."""
    constant = {c: rows[0].get(c) for c in SETTINGS if rows and len({row.get(c) for row in rows}) == 1}
    hidden = {"leaf_name", "bytes_down", "finished_at", *constant}
    shown = [c for c in columns if c not in hidden and any(row.get(c) is not None for row in rows)]
    table = Table(title=f"BranchKey round history: {work_dir}")
    for column in shown:
        table.add_column(column.replace("_", " "), no_wrap=True)
    for row in rows:
        row = row | {"aggregation_id": (row["aggregation_id"] or "-")[:8]}
        table.add_row(*(_text(row.get(column)) for column in shown))
    settings = [f"{name.replace('_', ' ')} {_text(value)}" for name, value in constant.items() if value is not None]
    if settings:
        table.caption = "In every round: " + ", ".join(settings)
    Console(width=max(400, Console().width)).print(table)


@app.command
def simulate(*, host: str | None = None, credentials_dir: Path | None = None, work_root: Path | None = None,
             leaves: int = 3, rounds: int = 10, fraction: float = 1.0, leaves_per_round: int | None = None,
             seed: int = 0, dask_address: str | None = None, workers: int | None = None,
             transport: Literal["websocket", "amqp"] = "websocket", amqp_host: str | None = None,
             participant: str = "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
             participant_options: str = "{}", aggregation_timeout_s: float = 600,
             upload_precision: Literal["native", "float32", "float16"] = "native",
             max_update_norm_ratio: float | None = None, dp_clip_norm: float | None = None,
             dp_noise_multiplier: float = 1.0, dp_delta: float = 1e-5, dp_epsilon_budget: float | None = None) -> None:
    """Simulate a federation: every leaf of CREDENTIALS_DIR against HOST, each leaf's rounds on a
    Dask worker. Without --host, a local bk-server and Prefect server are started for LEAVES new
    leaves (as `make demo` does) and stopped at the end.

    Parameters
    ----------
    host
        The platform's API, e.g. http://127.0.0.1:8080 for a local bk-server; none: start one.
    credentials_dir
        One credentials JSON per leaf, as the platform issued them (with --host).
    work_root
        Each leaf's work dir is WORK_ROOT/<leaf name>; on a cluster, a directory every worker reaches.
    leaves
        Without --host: how many leaves the local federation has.
    rounds
        Rounds to run.
    fraction
        The fraction of the leaves drawn for each round (client sampling), in (0, 1].
    leaves_per_round
        How many leaves each round draws (instead of a fraction).
    seed
        The seed the leaves of each round are drawn from (the same seed draws the same leaves).
    dask_address
        The Dask scheduler to run the leaves on, e.g. tcp://10.0.0.5:8786; default: a local cluster.
    workers
        Worker processes of the local cluster (default: one per core).
    transport
        How aggregation notices arrive.
    amqp_host
        RabbitMQ host, when it is not the API's host.
    participant
        `package.module:Class`; leaf i gets `leaf_index=i, leaves=N` added to its options.
    participant_options
        The participant's keyword options, a JSON object.
    aggregation_timeout_s
        How long a leaf waits for a round's aggregation.
    upload_precision
        native (as trained), float32 or float16 (half the bytes), for every leaf.
    max_update_norm_ratio
        The update guard: refuse an update further from the global model than this many times
        the leaf's recent median (off by default).
    dp_clip_norm
        Turns client-side differential privacy on: each update's delta is clipped to this L2 norm.
    dp_noise_multiplier
        Gaussian noise of this many clip norms per coordinate.
    dp_delta
        The delta each leaf's epsilon is reported for.
    dp_epsilon_budget
        A leaf stops before the round that would take it past this epsilon.
    """
    if host is None:
        given = {"--credentials-dir": credentials_dir, "--work-root": work_root, "--leaves-per-round": leaves_per_round,
                 "--amqp-host": amqp_host, "--dp-clip-norm": dp_clip_norm, "--dp-epsilon-budget": dp_epsilon_budget,
                 "--max-update-norm-ratio": max_update_norm_ratio}
        if named := [option for option, value in given.items() if value is not None]:
            _fail("simulate", UsageError(f"{', '.join(named)}: only with --host; without it, the local federation runs "
                                         "the digits example with --leaves, --rounds, --fraction, --seed, "
                                         "--transport, --dask-address and --workers"))
        try:
            from prefect_branchkey.bk_dev.demo import main as local_federation
        except MissingExtraError as exc:
            _fail("simulate", exc)

        arguments = ["--no-keep", "--no-statistics", "--leaves", str(leaves), "--rounds", str(rounds),
                     "--fraction", str(fraction), "--seed", str(seed), "--transport", transport,
                     "--round-deadline-s", str(LOCAL_ROUND_DEADLINE_S)]
        arguments += ["--dask-address", dask_address] if dask_address else []
        arguments += ["--workers", str(workers)] if workers is not None else []
        raise SystemExit(local_federation(arguments))
    if credentials_dir is None or work_root is None:
        _fail("simulate", UsageError("--credentials-dir and --work-root are needed with --host"))
    try:
        from prefect_branchkey.flows.federation.simulation import simulate as simulate_on_dask

        options = parse_options(participant_options)
        update = UpdateSettings(upload_precision=upload_precision, max_update_norm_ratio=max_update_norm_ratio)
        privacy = PrivacySettings(clip_norm=dp_clip_norm, noise_multiplier=dp_noise_multiplier, delta=dp_delta,
                                  epsilon_budget=dp_epsilon_budget)
        simulate_on_dask(host, str(credentials_dir), str(work_root), dask_address=dask_address, workers=workers,
                         participant=participant, participant_options=options, rounds=rounds, transport=transport,
                         amqp_host=amqp_host, aggregation_timeout_s=aggregation_timeout_s, fraction=fraction,
                         leaves_per_round=leaves_per_round, seed=seed, update=update, privacy=privacy)
    except ValidationError as exc:
        _fail("simulate", UsageError(settings_error(exc)))
    except BranchKeyError as exc:
        _fail("simulate", exc)


def _fail(command: str, error: Exception) -> NoReturn:
    print(f"bk {command}: {error}", file=sys.stderr)
    raise SystemExit(2)


@app.command
def statistics(*, host: str, credentials_dir: Path, work_root: Path,
               transport: Literal["websocket", "amqp"] = "websocket", amqp_host: str | None = None,
               participant: str = "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
               participant_options: str = "{}", source: str | None = None, timeout_s: float = 600,
               output: Path | None = None) -> None:
    """Run every leaf of CREDENTIALS_DIR's statistics round at once against HOST; print (or write to
    OUTPUT as JSON) the federation's per-column statistics as the first leaf received them.

    Parameters
    ----------
    host
        The platform's API, e.g. http://127.0.0.1:8080 for a local bk-server.
    credentials_dir
        One credentials JSON per leaf, as the platform issued them.
    work_root
        Each leaf's work dir is WORK_ROOT/<leaf name>.
    transport
        How the combined result's notice arrives.
    amqp_host
        RabbitMQ host, when it is not the API's host.
    participant
        `package.module:Class` whose `statistics()` gives the raw columns; leaf i gets
        `leaf_index=i, leaves=N` added to its options.
    participant_options
        The participant's keyword options, a JSON object.
    source
        Instead of the participant's hook: `package.module:function` returning the columns.
    timeout_s
        How long a leaf waits for the combined result.
    output
        Write the per-leaf tables as JSON here instead of printing the first leaf's.
    """
    try:
        options = parse_options(participant_options)
    except ParticipantError as exc:
        print(f"bk statistics: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    results = federation_statistics(host, str(credentials_dir), str(work_root), participant, options, source,
                                    transport, amqp_host, timeout_s)
    if output is not None:
        output.write_text(json.dumps({leaf: result.table for leaf, result in results.items()}, indent=1))
        return
    table = Table(title="Federated statistics per column", title_justify="left")
    first = next(iter(results.values())).table
    for column in first[0]:
        table.add_column(column)
    for row in first:
        table.add_row(*(_text(value) for value in row.values()))
    Console().print(table)


@dev_app.command(name="prefect-server")
def prefect_server(*, port: int = 4200, data: Path = Path("prefect-data")) -> None:
    """Run a trial Prefect server on an embedded PostgreSQL at 127.0.0.1:PORT, its data in DATA,
    until Ctrl-C or SIGTERM; print the PREFECT_API_URL to export. Started again on the same DATA,
    it has the same flows, deployments and runs.

    Parameters
    ----------
    port
        The server's port on 127.0.0.1 (the docs assume 4200).
    data
        The directory of its database and logs (created on first start; reused after).
    """
    try:
        from prefect_branchkey.bk_dev.processes import ServerStartError
        from prefect_branchkey.bk_dev.trial_server import serve_trial_server
    except MissingExtraError as exc:
        _fail("dev prefect-server", exc)
    try:
        status = serve_trial_server(data, port)
    except ServerStartError as exc:
        _fail("dev prefect-server", exc)
    raise SystemExit(status)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
