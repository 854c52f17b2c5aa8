"""`bk audit verify | export | acknowledge` on a leaf's trail, through the `bk` app in this process (a
round's trail is checked by the real `bk` process in `tests/integration/test_flows_federation.py`)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq  # type: ignore[import-untyped]  # pyarrow: no stubs
import pytest

from prefect_branchkey.deployments.cli import app
from prefect_branchkey.flows.leaf.audit import AuditTrail, trail_path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


Bk = Callable[..., Result]


@pytest.fixture
def bk(capsys: pytest.CaptureFixture[str]) -> Bk:
    """`bk ARGS...` as a command line gives them, in this process: its exit code and output."""

    def run(*args: str, cwd: Path | None = None) -> Result:
        before = Path.cwd()
        if cwd is not None:
            os.chdir(cwd)
        try:
            app(list(args), result_action="return_value")
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        finally:
            os.chdir(before)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def leaf_trail(work_dir: Path) -> str:
    """Two uploads (the second never confirmed) and a download; returns the head."""
    trail = AuditTrail(work_dir)
    trail.sending("upload", "leaf.run1.round1.aa", {"destination": "http://127.0.0.1:8080", "run_number": 1,
                                                   "round": 1, "bytes": 1234, "sha256": "aa" * 32})
    trail.confirmed("upload", "leaf.run1.round1.aa", {"file_id": "f-1"})
    trail.received("download", "agg-1", {"aggregation_id": "agg-1", "round": 1, "bytes": 999, "sha256": "bb" * 32})
    return trail.sending("upload", "leaf.run1.round2.cc", {"round": 2, "bytes": 1300, "sha256": "cc" * 32})


def test_verify_says_an_intact_trail_its_head_and_what_was_never_confirmed(tmp_path: Path, bk: Bk) -> None:
    head = leaf_trail(tmp_path)
    result = bk("audit", "verify", str(tmp_path), "--head", head)
    assert result.returncode == 0, result.stderr
    assert f"4 entries, chain intact, head {head}" in result.stdout
    assert "1 payload(s) recorded as sending and never confirmed" in result.stdout
    assert "leaf.run1.round2.cc" in result.stdout


def test_verify_exits_1_naming_the_edited_entry(tmp_path: Path, bk: Bk) -> None:
    leaf_trail(tmp_path)
    path = trail_path(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"bytes":1234', b'"bytes":12'))
    result = bk("audit", "verify", str(tmp_path))
    assert result.returncode == 1
    assert "broken at entry 1 (line 1): edited" in result.stderr


def test_verify_exits_1_when_the_trail_no_longer_holds_an_anchored_head(tmp_path: Path, bk: Bk) -> None:
    head = leaf_trail(tmp_path)
    path = trail_path(tmp_path)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    result = bk("audit", "verify", str(tmp_path), "--head", head)
    assert result.returncode == 1 and f"holds entry {head} no longer" in result.stderr


def test_export_writes_one_row_per_entry_as_csv_and_parquet(tmp_path: Path, bk: Bk) -> None:
    leaf_trail(tmp_path / "leaf")
    as_csv = bk("audit", "export", str(tmp_path / "leaf"), "--format", "csv", cwd=tmp_path)
    assert as_csv.returncode == 0, as_csv.stderr
    with (tmp_path / "audit-trail.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["seq"], r["kind"], r["step"], r["bytes"]) for r in rows] == [
        ("1", "upload", "sending", "1234"), ("2", "upload", "confirmed", ""), ("3", "download", "received", "999"),
        ("4", "upload", "sending", "1300")]
    target = tmp_path / "trail.parquet"
    as_parquet = bk("audit", "export", str(tmp_path / "leaf"), "--format", "parquet", "--output", str(target))
    assert as_parquet.returncode == 0, as_parquet.stderr
    table = pq.read_table(target)
    assert table.column("sha256").to_pylist() == ["aa" * 32, None, "bb" * 32, "cc" * 32]


def test_acknowledge_seals_a_reviewed_break_and_verify_reports_it(tmp_path: Path, bk: Bk) -> None:
    leaf_trail(tmp_path)
    path = trail_path(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    refused = bk("audit", "acknowledge", str(tmp_path), "--reason", "")
    assert refused.returncode == 2 and "needs a reason" in refused.stderr
    sealed = bk("audit", "acknowledge", str(tmp_path), "--reason", "reviewed: disk full during the last write")
    assert sealed.returncode == 0, sealed.stderr
    verified = bk("audit", "verify", str(tmp_path))
    assert verified.returncode == 0, verified.stderr
    assert "acknowledged break at line 4: not a complete audit entry" in verified.stdout
    assert "sealed as: line 4: the last line is cut short (truncated)" in verified.stdout
    assert "reviewed: disk full during the last write" in verified.stdout


def test_verify_exits_2_when_there_is_no_trail(tmp_path: Path, bk: Bk) -> None:
    result = bk("audit", "verify", str(tmp_path))
    assert result.returncode == 2 and "no audit trail at" in result.stderr
