"""The round history: a Parquet dataset with one row per leaf per round, compacted as it grows.

Each row is first written as a file of its own (a *loose* row), atomically, under a name fixed by
(run, round, leaf, and the status unless `completed`; a drift check's `evaluated` row also by its
time, and it sorts after its round's row; an analytics row says so, a kind of its own that
training readers skip). That name is the row's key for good: recording the same round again
replaces its row, and a `resynced` row never replaces a `completed` one (their names differ).

Once the directory holds more than `COMPACT_AFTER` loose rows, they are merged into one
*segment* (`segment-<n>.parquet`, n rising; each row keeps its key in the `history_file`
column), written atomically and synced before the loose files are deleted. While the newest
segment holds at least as many rows as the one before it, the two are merged under the newer
one's name, the older one deleted after: a history of N rows is at most `COMPACT_AFTER` loose
files and about log2(N / `COMPACT_AFTER`) segments, so reading it opens few files.

A reader takes each key from its loose file when there is one, else from the highest-numbered
segment holding it. Hence: appending never rewrites a file in a way a crash can corrupt (every
write is a new file or an atomic replacement, and what it supersedes is deleted only once it is
durable); a crash mid-write leaves only a temporary file that readers ignore; a crash between
writing a segment and deleting what it merged leaves only duplicates that readers drop; a round
recorded again after compaction lands as a loose file and wins. Writers (appends and their
compaction) take turns on a lock file; readers take no lock, and look again should a
compaction move a row while they read it.

`history_files` names every row by its key in (run, round, key) order, loose or compacted (a
compacted row's path names no file any more: `rows_of` reads it from its segment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# pyarrow ships no type information (no stubs, no py.typed).
import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow: no stubs
import pyarrow.compute as pc  # type: ignore[import-untyped]  # pyarrow: no stubs
import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow: no stubs

from prefect_branchkey.bk_blocks.files import atomic_write, exclusively

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
    ("payloads_sent", pa.int64()), ("audit_head", pa.string()), ("updates_aggregated", pa.int64()),
])
LEARNING = "learning"
ANALYTICS = "analytics"
# Loose row files a history directory holds before they are merged into a segment (read when a
# row is appended: tests and benchmarks lower it to compact often).
COMPACT_AFTER = 16
# The column a segment keeps each row's key (the name of the loose file it was written as) in.
KEY = "history_file"
SEGMENT_SCHEMA = SCHEMA.append(pa.field(KEY, pa.string()))
LOOSE_FILES = "run-*.parquet"
SEGMENT_PREFIX = "segment-"
SEGMENT_FILES = f"{SEGMENT_PREFIX}*.parquet"
LOCK = ".lock"
# How often a reader looks again for rows a concurrent compaction moved before it gives up.
LOOKS = 10
ORDER = (("run_number", "ascending"), ("round", "ascending"), ("leaf_name", "ascending"), (KEY, "ascending"))

logger = logging.getLogger(__name__)


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
    `payloads_sent` counts what the round sent (its upload, its metrics) and `audit_head` is the
    leaf's audit trail's head hash after them (`prefect_branchkey.flows.leaf.audit`);
    `updates_aggregated` how many updates the round's aggregate averaged, when the platform says.
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
    payloads_sent: int | None = None
    audit_head: str | None = None
    updates_aggregated: int | None = None


def history_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "history"


def append_record(work_dir: Path, record: RoundRecord, filed_under: tuple[int, int] | None = None) -> Path:
    """Write one round's row as its own Parquet file, atomically; return its path. The file is
    named after the row's (run, round), or `filed_under` (a drift check is filed after the latest
    row, whichever model it evaluated, so it is published after everything recorded before it).
    Past `COMPACT_AFTER` loose rows, the directory is then compacted."""
    directory = history_dir(work_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _file_name(record, filed_under)
    row = asdict(record)
    row["train_metrics"] = list(row["train_metrics"].items())
    row["eval_metrics"] = list(row["eval_metrics"].items())
    table = pa.Table.from_pylist([row], schema=SCHEMA)
    with _writing(directory):
        with atomic_write(path) as handle:
            pq.write_table(table, handle)
        _compact_quietly(directory, COMPACT_AFTER)
    return path


def _file_name(record: RoundRecord, filed_under: tuple[int, int] | None) -> str:
    """A row's key: its (run, round) or `filed_under`, its leaf, and what tells it from the round's other rows."""
    suffix = "" if record.status == "completed" else f"-{record.status}"
    if record.status == "evaluated":
        # A drift check of the round's model: after the round's own row, one file per check.
        stamp = int((record.finished_at or datetime.now(UTC)).timestamp() * 1000)
        suffix = f"~evaluated-{stamp}"
    suffix += "" if record.round_kind == LEARNING else f"-{record.round_kind}"
    run_number, round_number = filed_under or (record.run_number, record.round)
    return f"run-{run_number:04d}-round-{round_number:06d}-{record.leaf_id}{suffix}.parquet"


def history_files(work_dir: Path, kinds: tuple[str, ...] = (LEARNING,)) -> list[Path]:
    """The work dir's history rows of these round kinds (training rounds unless asked), one path per
    row named by its key, in (run, round) order. A compacted row's path names no file any more;
    `rows_of` reads it from its segment, and `file_round` and `file_kind` read its name."""
    directory = history_dir(work_dir)
    return [directory / key for key in sorted(_index(directory)) if _kind(key) in kinds]


def file_kind(path: Path) -> str:
    """The kind of round a history file records, from its name (analytics rows say so)."""
    return _kind(path.name)


def _kind(key: str) -> str:
    return ANALYTICS if key.endswith(f"-{ANALYTICS}.parquet") else LEARNING


def file_round(path: Path) -> tuple[int, int]:
    """The (run, round) a history file records, from its name."""
    parts = path.name.split("-")
    return int(parts[1]), int(parts[3])


def read_history(work_dir: Path, last: int | None = None) -> pa.Table:
    """The recorded rounds of the work dir (the `last` ones, or all), by run and round."""
    return _read_latest(history_dir(work_dir), last, (LEARNING,)).drop_columns([KEY])


def history_rows(work_dir: Path, last: int | None = None,
                 kinds: tuple[str, ...] = (LEARNING,)) -> list[dict[str, Any]]:
    """The history (the `last` rounds, or all, of these kinds) as plain dicts, metrics as dicts.
    Only the files holding those rows are read whole (of the others, a segment's keys), so the
    latest rows cost about the same whatever the history's length."""
    return list(_plain_rows(_read_latest(history_dir(work_dir), last, kinds)).values())


def rows_of(files: list[Path]) -> list[dict[str, Any]]:
    """These history files' rows as plain dicts, metrics as dicts."""
    return list(rows_by_file(files).values())


def rows_by_file(files: list[Path]) -> dict[str, dict[str, Any]]:
    """These history files' rows (of one history: `history_files` names them) by file name, in
    (run, round, leaf) order, as `rows_of` gives them."""
    tables = [_read_keys(directory, keys, {key: directory / key for key in keys})
              for directory, keys in _by_directory(files).items()]
    return _plain_rows(_sorted(tables))


def compact_history(work_dir: Path, after: int | None = None) -> bool:
    """Merge the history's loose rows into a new segment if there are more than `after` (default
    `COMPACT_AFTER`), then merge segments as the module says; True when it compacted. Safe at any
    time: it takes the writers' turn."""
    directory = history_dir(work_dir)
    if not directory.is_dir():
        return False
    with _writing(directory):
        return _compact(directory, COMPACT_AFTER if after is None else after)


def _latest(keys: list[str], last: int | None) -> list[str]:
    return keys[-last:] if last is not None else keys


def _read_latest(directory: Path, last: int | None, kinds: tuple[str, ...]) -> pa.Table:
    """The `last` rows (or all) of these kinds, sorted, each with its key."""
    index = _index(directory)
    return _sorted([_read_keys(directory, _latest([key for key in sorted(index) if _kind(key) in kinds], last),
                               index)])


def _by_directory(files: Iterable[Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for path in files:
        grouped.setdefault(path.parent, []).append(path.name)
    return grouped


def _sorted(tables: list[pa.Table]) -> pa.Table:
    """The rows by run, round and leaf (and key, so a round's rows keep the order of their files)."""
    if not tables:
        return SEGMENT_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by(list(ORDER))


def _plain_rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Rows as plain dicts by key, metrics as dicts, the key itself left out."""
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        row["train_metrics"] = dict(row["train_metrics"] or [])
        row["eval_metrics"] = dict(row["eval_metrics"] or [])
        row["round_kind"] = row["round_kind"] or LEARNING
        rows[row.pop(KEY)] = row
    return rows


# ---------------------------------------------------------------------------------------------
# Where each row lives: its loose file, else the newest segment holding it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    """A segment file, its number (the higher one wins a key both hold) and the keys it holds."""

    path: Path
    number: int
    keys: list[str]


def _index(directory: Path) -> dict[str, Path]:
    """Each row's key → the file holding it: its loose file, else the highest-numbered segment
    holding it. Loose files are listed first: one compacted meanwhile is in a segment listed after."""
    loose = list(directory.glob(LOOSE_FILES))
    index: dict[str, Path] = {}
    for segment in _segments(directory):
        index.update(dict.fromkeys(segment.keys, segment.path))
    index.update((path.name, path) for path in loose)
    return index


def _segments(directory: Path) -> list[_Segment]:
    """The directory's segments, oldest first, each with its keys; listed again when one is merged
    away while they are read."""
    for _ in range(LOOKS - 1):
        try:
            return _list_segments(directory)
        except FileNotFoundError:
            continue
    return _list_segments(directory)


def _list_segments(directory: Path) -> list[_Segment]:
    return [_segment_keys(path) for path in sorted(directory.glob(SEGMENT_FILES))]


def _segment_keys(path: Path) -> _Segment:
    with _native_file(path) as handle:
        keys = pq.ParquetFile(handle).read(columns=[KEY], use_threads=False)[KEY].to_pylist()
    return _Segment(path, int(path.name.removeprefix(SEGMENT_PREFIX).removesuffix(".parquet")), keys)


def _read_keys(directory: Path, keys: list[str], index: dict[str, Path]) -> pa.Table:
    """The rows of these keys, each with its key, from the files `index` says hold them. A row no
    longer there (a compaction moved it meanwhile) is looked for again in a fresh index."""
    tables: list[pa.Table] = []
    wanted = keys
    for _ in range(LOOKS):
        moved: list[str] = []
        for path, in_file in _by_file(directory, wanted, index).items():
            try:
                tables.append(_read_rows(path, in_file))
            except FileNotFoundError:
                moved.extend(in_file)
        if not moved:
            return pa.concat_tables(tables) if tables else SEGMENT_SCHEMA.empty_table()
        wanted, index = moved, _index(directory)
    raise FileNotFoundError(f"history rows kept moving while being read in {directory}: {wanted[:3]}")


def _by_file(directory: Path, keys: list[str], index: dict[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for key in keys:
        if key not in index:
            raise FileNotFoundError(f"no history row {key} in {directory}")
        grouped.setdefault(index[key], []).append(key)
    return grouped


def _read_rows(path: Path, keys: list[str]) -> pa.Table:
    """These keys' rows from one file: a loose row's own, or a segment's."""
    table = _read_file(path)
    if not path.name.startswith(SEGMENT_PREFIX):
        return table.append_column(KEY, pa.array([path.name] * table.num_rows, pa.string()))
    return table.filter(pc.is_in(table[KEY], value_set=pa.array(keys, pa.string())))


def _native_file(path: Path) -> pa.NativeFile:
    """The file opened by Arrow, not by Python (FileNotFoundError when gone). Arrow may finish a
    read on its I/O threads; freeing a buffer there that holds a Python file's bytes takes the GIL,
    and when that happens while the interpreter exits (a leaf reading its history just before it
    ends) the process aborts ('terminate called without an active exception')."""
    return pa.OSFile(str(path))


def _read_file(path: Path) -> pa.Table:
    """A loose row or a segment in today's schema (a column an older version did not write is null)."""
    schema = SEGMENT_SCHEMA if path.name.startswith(SEGMENT_PREFIX) else SCHEMA
    with _native_file(path) as handle:
        table = pq.ParquetFile(handle).read(use_threads=False)
    if table.schema.equals(schema):
        return table
    return pa.Table.from_arrays([table[f.name].cast(f.type) if f.name in table.column_names
                                 else pa.nulls(table.num_rows, f.type) for f in schema], schema=schema)


# ---------------------------------------------------------------------------------------------
# Compaction: loose rows into a segment, segments pairwise into one.
# ---------------------------------------------------------------------------------------------


@contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Hold the history's writers' lock (appends and compactions of other threads and processes wait)."""
    with exclusively(directory / LOCK):
        yield


def _compact_quietly(directory: Path, after: int) -> None:
    """Compaction after an append: the row is recorded either way, so a failure is logged and the
    next append tries again."""
    try:
        _compact(directory, after)
    except (OSError, pa.ArrowException) as exc:
        logger.warning("history: could not compact %s (%s: %s); the next round tries again",
                       directory, type(exc).__name__, exc)


def _compact(directory: Path, after: int) -> bool:
    """With the writers' lock held: past `after` loose rows, merge them all into a new segment
    (durable before they are deleted), then merge segments."""
    loose = sorted(directory.glob(LOOSE_FILES))
    if len(loose) <= after:
        return False
    segments = _segments(directory)
    number = segments[-1].number + 1 if segments else 1
    table = pa.concat_tables([_read_rows(path, [path.name]) for path in loose]).sort_by(KEY)
    segments.append(_write_segment(directory, number, table))
    for path in loose:
        path.unlink()
    _merge_segments(directory, segments)
    return True


def _merge_segments(directory: Path, segments: list[_Segment]) -> None:
    """While the newest segment holds at least as many rows as the one before it, merge the older
    into the newer one's name (the newer's row wins a key both hold), then delete the older."""
    while len(segments) >= 2 and len(segments[-1].keys) >= len(segments[-2].keys):
        older, newer = segments[-2], segments[-1]
        old, new = _read_file(older.path), _read_file(newer.path)
        kept = old.filter(pc.invert(pc.is_in(old[KEY], value_set=new[KEY])))
        segments[-2:] = [_write_segment(directory, newer.number, pa.concat_tables([kept, new]).sort_by(KEY))]
        older.path.unlink()


def _write_segment(directory: Path, number: int, table: pa.Table) -> _Segment:
    """Write a segment atomically and make its name durable (only then may what it merged go)."""
    path = directory / f"{SEGMENT_PREFIX}{number:08d}.parquet"
    with atomic_write(path) as handle:
        pq.write_table(table, handle)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return _Segment(path, number, table[KEY].to_pylist())


def utc_from_timestamp(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)
