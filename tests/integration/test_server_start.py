"""How a local bk-server comes up and goes: on a free port it binds itself and names in its admin
file, on the same port after a restart, never taking another server's answer on its port for its
own, and Ctrl-C ends it with status 0."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from prefect_branchkey.bk_dev.processes import ServerStartError

from ..support.bkserver import BkServer


def test_a_server_binds_a_free_port_itself_and_names_it_in_its_admin_file(tmp_path: Path) -> None:
    server = BkServer(tmp_path / "data")
    assert server.port == 0, "the port is the server's to choose"
    with server:
        assert server.port != 0
        assert json.loads(server.admin_file.read_text())["url"] == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{server.url}/healthz", timeout=10).is_success


def test_a_restarted_server_answers_on_the_port_it_had(make_server: Callable[..., BkServer]) -> None:
    server = make_server()
    port = server.port
    server.restart()
    assert server.port == port
    assert httpx.get(f"{server.url}/healthz", timeout=10).is_success


def test_a_server_whose_port_another_holds_fails_to_start_rather_than_take_its_answers(
        make_server: Callable[..., BkServer], tmp_path: Path) -> None:
    holder = make_server()
    late = BkServer(tmp_path / "data")
    late.port = holder.port
    try:
        with pytest.raises(ServerStartError, match="bk-server exited"):
            late.start(timeout=30)
    finally:
        late.stop()
    assert "address already in use" in late.log_path.read_text().lower()


def test_ctrl_c_stops_a_serving_server_with_status_0(make_server: Callable[..., BkServer]) -> None:
    server = make_server()
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0, server.log_path.read_text()
