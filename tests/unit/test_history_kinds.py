"""The history's round kinds: statistics rounds are rows of their own that training readers skip."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefect_branchkey.flows.leaf.history import (
    ANALYTICS,
    LEARNING,
    SCHEMA,
    RoundRecord,
    append_record,
    history_dir,
    history_rows,
)


def record(round_number: int, kind: str = LEARNING) -> RoundRecord:
    return RoundRecord("branch", "leaf", "leaf-a", 1, round_number, "completed", round_kind=kind)


def test_analytics_row_has_a_file_of_its_own(tmp_path: Path) -> None:
    assert append_record(tmp_path, record(1, ANALYTICS)).name == "run-0001-round-000001-leaf-analytics.parquet"
    assert append_record(tmp_path, record(1)).name == "run-0001-round-000001-leaf.parquet"


def test_training_readers_see_training_rows_only(tmp_path: Path) -> None:
    append_record(tmp_path, record(1, ANALYTICS))
    append_record(tmp_path, record(2))
    assert [(r["round"], r["round_kind"]) for r in history_rows(tmp_path)] == [(2, LEARNING)]
    assert [(r["round"], r["round_kind"]) for r in history_rows(tmp_path, kinds=(LEARNING, ANALYTICS))] == \
        [(1, ANALYTICS), (2, LEARNING)]


def test_rows_written_before_round_kinds_read_as_learning(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in SCHEMA if f.name != "round_kind"])
    row = {name: None for name in old_schema.names} | {"leaf_id": "leaf", "run_number": 1, "round": 1,
                                                       "status": "completed", "bytes_up": 0, "bytes_down": 0}
    history_dir(tmp_path).mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema),
                   history_dir(tmp_path) / "run-0001-round-000001-leaf.parquet")
    assert [r["round_kind"] for r in history_rows(tmp_path)] == [LEARNING]
