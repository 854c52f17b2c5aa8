"""What a failing test prints of the processes it started: the tail of each log written since its
module began, the empty ones named on one line, and what a Prefect server in trouble answered."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ..support.failure_report import TAIL_LINES, _flow_runs, log_tails


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


class _InternalError(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b'{"exception_message": "Internal Server Error"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_api() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _InternalError)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_a_prefect_server_answering_an_error_is_reported_with_its_answer(failing_api: str) -> None:
    with pytest.raises(ValueError) as raised:
        _flow_runs(failing_api)
    assert str(raised.value) == 'HTTP 500: {"exception_message": "Internal Server Error"}'
