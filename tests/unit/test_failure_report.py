"""What a failing test prints of the logs its processes wrote: the tail of each log written since
its module began, and the empty ones named on one line."""

from __future__ import annotations

import os
from pathlib import Path

from ..support.failure_report import TAIL_LINES, log_tails


def _log(path: Path, text: str, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def test_a_log_written_since_the_module_began_shows_its_last_lines(tmp_path: Path) -> None:
    _log(tmp_path / "bk1" / "bk-server-data.log", "".join(f"line {n}\n" for n in range(100)), 2000)
    tails = log_tails(tmp_path, since=1000)
    assert f"==> bk1/bk-server-data.log (last {TAIL_LINES} lines) <==" in tails
    assert "line 99" in tails and f"line {99 - TAIL_LINES}\n" not in tails


def test_a_log_last_written_before_the_module_began_is_left_out(tmp_path: Path) -> None:
    _log(tmp_path / "old.log", "an earlier module's server\n", 500)
    assert log_tails(tmp_path, since=1000) == ""


def test_empty_logs_are_named_on_one_line_before_the_others(tmp_path: Path) -> None:
    for n in range(3):
        _log(tmp_path / f"bk{n}" / "bk-server-data.log", "", 2000 + n)
    _log(tmp_path / "leaf.log", "round 1 failed\n", 1500)
    tails = log_tails(tmp_path, since=1000)
    assert tails.splitlines()[0] == ("==> empty: bk0/bk-server-data.log, bk1/bk-server-data.log, "
                                     "bk2/bk-server-data.log <==")
    assert tails.count("<==") == 2 and "round 1 failed" in tails
