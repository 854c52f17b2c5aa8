"""History compaction: loose row files merged into segments read back as the same rows, whatever a
crash or a concurrent compaction left, and publication still sends each row once, in order."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefect_branchkey.flows.leaf.history as history
import prefect_branchkey.flows.publishing.publication as publication
from prefect_branchkey.flows.leaf.history import (
    ANALYTICS,
    KEY,
    SEGMENT_SCHEMA,
    RoundRecord,
    append_record,
    compact_history,
    file_round,
    history_dir,
    history_files,
    history_rows,
    read_history,
    rows_of,
)
from prefect_branchkey.flows.publishing.publication import mark_published, publish_pending, published_through

START = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def compact_after_four(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction after four loose rows, so a few rounds compact several times."""
    monkeypatch.setattr(history, "COMPACT_AFTER", 4)


def record(round_number: int, status: str = "completed", **fields: Any) -> RoundRecord:
    defaults: dict[str, Any] = {"aggregation_id": f"agg-{round_number}",
                                "eval_metrics": {"accuracy": round_number / 100},
                                "finished_at": START + timedelta(hours=round_number)}
    return RoundRecord("branch", "leaf", "leaf-a", 1, round_number, status, **(defaults | fields))


def rounds(work_dir: Path, count: int, first: int = 1) -> None:
    for number in range(first, first + count):
        append_record(work_dir, record(number))


def loose(work_dir: Path) -> list[str]:
    return sorted(path.name for path in history_dir(work_dir).glob("run-*.parquet"))


def segments(work_dir: Path) -> list[str]:
    return sorted(path.name for path in history_dir(work_dir).glob("segment-*.parquet"))


def test_reading_after_compaction_returns_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 1000)
    rounds(tmp_path, 30)
    before = history_rows(tmp_path)
    assert compact_history(tmp_path, after=4) is True
    assert loose(tmp_path) == [] and segments(tmp_path)
    assert history_rows(tmp_path) == before


def test_a_growing_history_is_a_few_loose_files_and_logarithmically_many_segments(tmp_path: Path) -> None:
    rounds(tmp_path, 120)
    assert len(loose(tmp_path)) <= 4
    assert len(segments(tmp_path)) <= math.log2(120 / 5) + 1
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(1, 121))


def test_history_files_name_compacted_rows_by_the_file_they_were_written_as(tmp_path: Path) -> None:
    rounds(tmp_path, 12)
    files = history_files(tmp_path)
    assert [file_round(path) for path in files] == [(1, n) for n in range(1, 13)]
    assert files[0].name == "run-0001-round-000001-leaf.parquet"
    assert not files[0].exists(), "round 1 lives in a segment now"


def test_last_rows_are_the_latest_rows_across_segments_and_loose_files(tmp_path: Path) -> None:
    rounds(tmp_path, 23)
    assert [row["round"] for row in history_rows(tmp_path, last=7)] == list(range(17, 24))
    assert read_history(tmp_path, last=3).column("round").to_pylist() == [21, 22, 23]
    assert read_history(tmp_path).schema == history.SCHEMA


def test_a_crash_after_writing_a_segment_before_deleting_loose_files_yields_no_duplicates(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch
                                                                                      ) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 1000)
    rounds(tmp_path, 9)
    before = history_rows(tmp_path)
    written = {path: path.read_bytes() for path in history_dir(tmp_path).glob("run-*.parquet")}
    compact_history(tmp_path, after=4)
    for path, data in written.items():
        path.write_bytes(data)
    assert len(loose(tmp_path)) == 9 and len(segments(tmp_path)) == 1
    assert history_rows(tmp_path) == before
    assert len(history_files(tmp_path)) == 9


def test_a_crash_after_merging_segments_before_deleting_the_older_one_yields_no_duplicates(tmp_path: Path) -> None:
    rounds(tmp_path, 5)
    [first] = segments(tmp_path)
    older = history_dir(tmp_path) / first
    kept = older.read_bytes()
    rounds(tmp_path, 5, first=6)
    assert first not in segments(tmp_path), "the second segment merged the first into its own name"
    older.write_bytes(kept)
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(1, 11))


def test_a_crash_mid_segment_write_leaves_a_temporary_file_readers_ignore(tmp_path: Path) -> None:
    rounds(tmp_path, 7)
    (history_dir(tmp_path) / ".segment-00000009.parquet.k1.tmp").write_bytes(b"PAR1 truncated")
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(1, 8))


def test_a_round_recorded_again_after_compaction_replaces_its_row(tmp_path: Path) -> None:
    rounds(tmp_path, 6)
    append_record(tmp_path, record(2, weighting=3.0))
    rows = history_rows(tmp_path)
    assert [row["round"] for row in rows] == list(range(1, 7))
    assert rows[1]["weighting"] == 3.0


def test_a_round_recorded_again_keeps_its_latest_row_through_later_compactions(tmp_path: Path) -> None:
    rounds(tmp_path, 6)
    append_record(tmp_path, record(2, weighting=3.0))
    rounds(tmp_path, 40, first=7)
    rows = history_rows(tmp_path)
    assert [row["round"] for row in rows] == list(range(1, 47))
    assert rows[1]["weighting"] == 3.0


def test_resynced_never_replaces_completed_after_compaction(tmp_path: Path) -> None:
    rounds(tmp_path, 6)
    append_record(tmp_path, record(3, "resynced", aggregation_id="latest"))
    rounds(tmp_path, 10, first=7)
    assert [(row["round"], row["status"]) for row in history_rows(tmp_path) if row["round"] == 3] == \
        [(3, "resynced"), (3, "completed")]


def test_a_drift_check_row_still_sorts_after_its_round_after_compaction(tmp_path: Path) -> None:
    rounds(tmp_path, 3)
    latest = file_round(history_files(tmp_path)[-1])
    append_record(tmp_path, record(1, "evaluated"), filed_under=latest)
    rounds(tmp_path, 10, first=4)
    names = [path.name for path in history_files(tmp_path)]
    assert "~evaluated-" in names[3] and file_round(history_files(tmp_path)[3]) == (1, 3)


def test_analytics_rows_stay_a_kind_of_their_own_after_compaction(tmp_path: Path) -> None:
    append_record(tmp_path, record(1, round_kind=ANALYTICS))
    rounds(tmp_path, 9, first=2)
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(2, 11))
    assert [row["round"] for row in history_rows(tmp_path, kinds=(ANALYTICS,))] == [1]


def test_rows_written_before_round_kinds_read_as_learning_after_compaction(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in history.SCHEMA if f.name != "round_kind"])
    row = {name: None for name in old_schema.names} | {"leaf_id": "leaf", "run_number": 1, "round": 1,
                                                       "status": "completed", "bytes_up": 0, "bytes_down": 0}
    history_dir(tmp_path).mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema),
                   history_dir(tmp_path) / "run-0001-round-000001-leaf.parquet")
    rounds(tmp_path, 6, first=2)
    assert "run-0001-round-000001-leaf.parquet" not in loose(tmp_path)
    assert [(row["round"], row["round_kind"]) for row in history_rows(tmp_path)][:2] == \
        [(1, "learning"), (2, "learning")]


def test_rows_listed_before_a_compaction_are_read_from_their_segment(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 1000)
    rounds(tmp_path, 8)
    files = history_files(tmp_path)
    compact_history(tmp_path, after=4)
    assert [row["round"] for row in rows_of(files)] == list(range(1, 9))


def test_a_compaction_between_listing_and_reading_loses_no_row(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process compacts after this reader listed the files: the loose rows it listed are
    in a new segment, and the segment it listed was merged into that one and deleted."""
    monkeypatch.setattr(history, "COMPACT_AFTER", 1000)
    rounds(tmp_path, 5)
    compact_history(tmp_path, after=0)
    rounds(tmp_path, 5, first=6)
    real = history._read_file
    compacted: list[bool] = []

    def compact_first(path: Path) -> pa.Table:
        if not compacted:
            monkeypatch.setattr(history, "_read_file", real)
            compacted.append(compact_history(tmp_path, after=0))
        return real(path)

    monkeypatch.setattr(history, "_read_file", compact_first)
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(1, 11))
    assert compacted == [True] and segments(tmp_path) == ["segment-00000002.parquet"]


def test_a_compaction_that_fails_leaves_the_row_recorded_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def no_room(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history, "_write_segment", no_room)
    rounds(tmp_path, 6)
    assert [row["round"] for row in history_rows(tmp_path)] == list(range(1, 7))
    assert len(loose(tmp_path)) == 6 and segments(tmp_path) == []
    assert "could not compact" in caplog.text


def published_rounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, list[int]]]:
    """What `publish_pending` sends: (round, status, the rounds its artifact shows), Prefect left out."""
    sent: list[tuple[int, str, list[int]]] = []

    def publish(leaf_name: str, rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
        sent.append((row["round"], row["status"], [r["round"] for r in rows]))

    monkeypatch.setattr(publication, "_publish_round", publish)
    return sent


def test_publication_publishes_each_row_once_across_a_compaction(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sent = published_rounds(monkeypatch)
    rounds(tmp_path, 3)
    assert publish_pending("leaf-a", tmp_path) == 3
    rounds(tmp_path, 9, first=4)
    assert segments(tmp_path), "rounds 1 to 3 were compacted after they were published"
    assert publish_pending("leaf-a", tmp_path) == 9
    assert publish_pending("leaf-a", tmp_path) == 0
    assert [number for number, _, _ in sent] == list(range(1, 13))
    assert published_through(tmp_path) == (1, 12)


def test_rows_compacted_before_they_were_published_are_published_once_in_order(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    sent = published_rounds(monkeypatch)
    rounds(tmp_path, 2)
    mark_published(tmp_path, *file_round(history_files(tmp_path)[-1]), history_files(tmp_path)[-1].name)
    rounds(tmp_path, 8, first=3)
    assert "run-0001-round-000003-leaf.parquet" not in loose(tmp_path), "round 3 was compacted unpublished"
    assert publish_pending("leaf-a", tmp_path) == 8
    assert [(number, status) for number, status, _ in sent] == [(n, "completed") for n in range(3, 11)]
    assert sent[-1][2] == list(range(1, 11))


def test_an_artifact_shows_the_rows_up_to_its_round_after_compaction(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sent = published_rounds(monkeypatch)
    monkeypatch.setattr(publication, "ARTIFACT_ROWS", 5)
    rounds(tmp_path, 12)
    publish_pending("leaf-a", tmp_path)
    assert [shown for _, _, shown in sent][-3:] == [[6, 7, 8, 9, 10], [7, 8, 9, 10, 11], [8, 9, 10, 11, 12]]


def long_history(work_dir: Path, total: int, segment_sizes: list[int]) -> None:
    """A history of `total` rows as compaction leaves one: segments of these sizes, the rest loose."""
    directory = history_dir(work_dir)
    directory.mkdir(parents=True)
    first = 1
    for number, size in enumerate(segment_sizes, start=1):
        rows = []
        for round_number in range(first, first + size):
            row = asdict(record(round_number))
            row["train_metrics"], row["eval_metrics"] = [], list(row["eval_metrics"].items())
            rows.append(row | {KEY: f"run-0001-round-{round_number:06d}-leaf.parquet"})
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), directory / f"segment-{number:08d}.parquet")
        first += size
    rounds(work_dir, total - first + 1, first=first)


def test_a_10000_row_history_reads_every_row_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 64)
    long_history(tmp_path, 10_000, [8192, 1024, 512, 256])
    rows = history_rows(tmp_path)
    assert [row["round"] for row in rows] == list(range(1, 10_001))
    assert rows[0]["eval_metrics"] == {"accuracy": 0.01}


def test_reading_the_last_rows_of_a_10000_row_history_reads_only_the_files_holding_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 64)
    long_history(tmp_path, 10_000, [8192, 1024, 512, 256])
    read: list[str] = []
    real = history._read_file

    def counted(path: Path) -> pa.Table:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(history, "_read_file", counted)
    assert [row["round"] for row in history_rows(tmp_path, last=5)] == list(range(9996, 10_001))
    assert not any(name.startswith("segment-") for name in read) and len(read) == 5
    read.clear()
    assert history_rows(tmp_path, last=20)[0]["round"] == 9981
    assert [name for name in read if name.startswith("segment-")] == ["segment-00000004.parquet"]


def test_a_row_recorded_again_in_a_long_history_is_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "COMPACT_AFTER", 64)
    long_history(tmp_path, 10_000, [8192, 1024, 512, 256])
    append_record(tmp_path, replace(record(5), weighting=2.0))
    rows = history_rows(tmp_path)
    assert len(rows) == 10_000 and rows[4]["weighting"] == 2.0
