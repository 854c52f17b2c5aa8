"""The round history: a Parquet dataset with one row per leaf per round.

Each row is its own file, written atomically under a name fixed by (run, round, leaf,
and the status unless `completed`; a drift check's `evaluated` row also by its time, and it
sorts after its round's row): appending never rewrites an earlier file, a crash
mid-write leaves only a temporary file that readers ignore, recording the same round
again replaces its row, and a `resynced` row never replaces a `completed` one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# pyarrow ships no type information (no stubs, no py.typed).
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow: no stubs
import pyarrow.dataset as ds  # type: ignore[import-untyped]  # pyarrow: no stubs
import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow: no stubs

from prefect_branchkey.bk_blocks.files import atomic_write

METRICS = pa.map_(pa.string(), pa.float64())
SCHEMA = pa.schema([
    ("branch_id", pa.string()), ("leaf_id", pa.string()), ("leaf_name", pa.string()),
    ("run_number", pa.int64()), ("round", pa.int64()), ("status", pa.string()),
    ("file_id", pa.string()), ("aggregation_id", pa.string()), ("weighting", pa.float64()),
    ("train_metrics", METRICS), ("eval_metrics", METRICS),
    ("train_s", pa.float64()), ("upload_s", pa.float64()), ("wait_s", pa.float64()),
    ("download_s", pa.float64()), ("evaluate_s", pa.float64()), ("round_s", pa.float64()),
    ("bytes_up", pa.int64()), ("bytes_down", pa.int64()),
    ("update_norm", pa.float64()), ("upload_precision", pa.string()),
    ("dp_epsilon", pa.float64()), ("dp_delta", pa.float64()), ("clip_norm", pa.float64()),
    ("noise_multiplier", pa.float64()),
    ("tree_id", pa.string()), ("branch_name", pa.string()),
    ("primary_metric", pa.string()), ("best_run_number", pa.int64()), ("best_round", pa.int64()),
    ("best_value", pa.float64()), ("metric_drop", pa.float64()), ("metric_drop_alert", pa.float64()),
    ("served", pa.bool_()),
    ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
    ("flow_run_id", pa.string()),
    ("round_kind", pa.string()),
])
LEARNING = "learning"
ANALYTICS = "analytics"


@dataclass
class RoundRecord:
    """One leaf's round, as it goes into the history and into the round's result.

    Durations are seconds; `round_s` runs from the start of training to the metrics
    being sent (writing this row, the artifacts and the event come after it).
    `update_norm` is the L2 distance of the leaf's update to the global model it trained
    from (None in a run's first round; before DP clipping), `upload_precision` the dtype policy
    it was sent in; with DP on, `dp_epsilon` is the leaf's cumulative epsilon at `dp_delta`
    after this round, and `clip_norm`, `noise_multiplier` the settings it was noised with.
    `primary_metric` judges the global models (`prefect_branchkey.flows.leaf.promotion`): `best_*` name the best one so
    far, `metric_drop` is how far this round's fell below it (0 when it is the best),
    `metric_drop_alert` the drop that raises an alert, and `served` whether the site now serves it.
    """

    branch_id: str
    leaf_id: str
    leaf_name: str
    run_number: int
    round: int
    status: str
    file_id: str | None = None
    aggregation_id: str | None = None
    weighting: float | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    train_s: float | None = None
    upload_s: float | None = None
    wait_s: float | None = None
    download_s: float | None = None
    evaluate_s: float | None = None
    round_s: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    update_norm: float | None = None
    upload_precision: str | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    tree_id: str | None = None
    branch_name: str | None = None
    primary_metric: str | None = None
    best_run_number: int | None = None
    best_round: int | None = None
    best_value: float | None = None
    metric_drop: float | None = None
    metric_drop_alert: float | None = None
    served: bool | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    flow_run_id: str | None = None
    round_kind: str = LEARNING


def history_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "history"


def append_record(work_dir: Path, record: RoundRecord, filed_under: tuple[int, int] | None = None) -> Path:
    """Write one round's row as its own Parquet file, atomically; return its path. The file is
    named after the row's (run, round), or `filed_under` (a drift check is filed after the latest
    row, whichever model it evaluated, so it is published after everything recorded before it)."""
    directory = history_dir(work_dir)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = "" if record.status == "completed" else f"-{record.status}"
    if record.status == "evaluated":
        # A drift check of the round's model: after the round's own row, one file per check.
        stamp = int((record.finished_at or datetime.now(UTC)).timestamp() * 1000)
        suffix = f"~evaluated-{stamp}"
    suffix += "" if record.round_kind == LEARNING else f"-{record.round_kind}"
    run_number, round_number = filed_under or (record.run_number, record.round)
    path = directory / f"run-{run_number:04d}-round-{round_number:06d}-{record.leaf_id}{suffix}.parquet"
    row = asdict(record)
    row["train_metrics"] = list(row["train_metrics"].items())
    row["eval_metrics"] = list(row["eval_metrics"].items())
    table = pa.Table.from_pylist([row], schema=SCHEMA)
    with atomic_write(path) as handle:
        pq.write_table(table, handle)
    return path


def history_files(work_dir: Path, kinds: tuple[str, ...] = (LEARNING,)) -> list[Path]:
    """The work dir's history files of these round kinds (training rounds unless asked), one per
    round, in (run, round) order."""
    directory = history_dir(work_dir)
    files = sorted(directory.glob("*.parquet")) if directory.exists() else []
    return [f for f in files if file_kind(f) in kinds]


def file_kind(path: Path) -> str:
    """The kind of round a history file records, from its name (analytics rows say so)."""
    return ANALYTICS if path.name.endswith(f"-{ANALYTICS}.parquet") else LEARNING


def file_round(path: Path) -> tuple[int, int]:
    """The (run, round) a history file records, from its name."""
    parts = path.name.split("-")
    return int(parts[1]), int(parts[3])


def read_history(work_dir: Path, last: int | None = None) -> pa.Table:
    """The recorded rounds of the work dir (the `last` ones, or all), by run and round."""
    return _read_files(_latest(history_files(work_dir), last))


def _latest(files: list[Path], last: int | None) -> list[Path]:
    return files[-last:] if last is not None else files


def _read_files(files: list[Path]) -> pa.Table:
    if not files:
        return SCHEMA.empty_table()
    table = ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet").to_table()
    return table.sort_by([("run_number", "ascending"), ("round", "ascending"), ("leaf_name", "ascending")])


def history_rows(work_dir: Path, last: int | None = None,
                 kinds: tuple[str, ...] = (LEARNING,)) -> list[dict[str, Any]]:
    """The history (the `last` rounds, or all, of these kinds) as plain dicts, metrics as dicts."""
    return rows_of(_latest(history_files(work_dir, kinds), last))


def rows_of(files: list[Path]) -> list[dict[str, Any]]:
    """These history files' rows as plain dicts, metrics as dicts."""
    rows = _read_files(files).to_pylist()
    for row in rows:
        row["train_metrics"] = dict(row["train_metrics"] or [])
        row["eval_metrics"] = dict(row["eval_metrics"] or [])
        row["round_kind"] = row["round_kind"] or LEARNING
    return rows


def utc_from_timestamp(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)
