"""A transfer's progress in the log: a line per 10 % of a large transfer, one per 30 s of a long
one, nothing more for a small, fast one."""

from __future__ import annotations

import logging

import pytest

from prefect_branchkey.bk_blocks.progress import TransferProgress

from ..support.clock import Clock

MB = 1_000_000


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="transfer")
    return caplog


def _moved(log: pytest.LogCaptureFixture, total: int | None, chunks: int, chunk: int,
           seconds_per_chunk: float = 0.0) -> list[str]:
    """The lines logged while `chunks` chunks of `chunk` bytes move, `seconds_per_chunk` apart."""
    clock = Clock(now=0.0)
    progress = TransferProgress(logging.getLogger("transfer"), "upload of u.npz", total, clock=clock)
    for _ in range(chunks):
        clock.now += seconds_per_chunk
        progress.add(chunk)
    return log.messages


def test_a_large_transfer_logs_a_line_at_every_tenth(log: pytest.LogCaptureFixture) -> None:
    lines = _moved(log, 200 * MB, 200, MB)
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [f"{p} %" for p in range(10, 100, 10)]


def test_a_large_transfers_line_says_how_much_and_how_fast(log: pytest.LogCaptureFixture) -> None:
    lines = _moved(log, 100 * MB, 10, 10 * MB, seconds_per_chunk=1.0)
    assert lines[0] == "upload of u.npz: 10 % (10.0 of 100.0 MB, 10.0 MB/s)"


def test_a_small_fast_transfer_logs_nothing(log: pytest.LogCaptureFixture) -> None:
    assert _moved(log, 10 * MB, 10, MB, seconds_per_chunk=0.1) == []


def test_a_slow_small_transfer_logs_every_thirty_seconds(log: pytest.LogCaptureFixture) -> None:
    lines = _moved(log, 10 * MB, 10, MB, seconds_per_chunk=10.0)
    assert len(lines) == 3 and lines[0].startswith("upload of u.npz: 30 % (3.0 of 10.0 MB")


def test_a_transfer_of_unknown_size_logs_by_time(log: pytest.LogCaptureFixture) -> None:
    assert _moved(log, None, 7, MB, seconds_per_chunk=10.0) == [
        "upload of u.npz: 3.0 MB so far (0.1 MB/s)", "upload of u.npz: 6.0 MB so far (0.1 MB/s)"]
