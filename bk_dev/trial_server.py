"""`bk dev prefect-server`: the trial Prefect server of docs/edge-workers.md, in the foreground.

`LocalPrefectServer` on the embedded PostgreSQL, with the fixed port the docs use (4200 unless
`--port`) and its data in a named directory (`./prefect-data` unless `--data`), so it can be
stopped and started again on the same flows, deployments, Blocks and run history.

Invariants: a port already in use is refused in one line before anything starts; once started,
Ctrl-C or SIGTERM stops the server, then its PostgreSQL, and leaves no process of either (the
children also get SIGTERM from the kernel should this process die uncleanly); a server that
exits by itself stops the database too and makes the command exit non-zero.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

import httpx

from prefect_branchkey.bk_dev.prefect_database import POSTGRES
from prefect_branchkey.bk_dev.prefect_server import STARTUP_TIMEOUT_S, LocalPrefectServer
from prefect_branchkey.bk_dev.processes import ServerStartError

DEFAULT_PORT = 4200
DEFAULT_DATA = Path("prefect-data")
HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PortInUseError(ServerStartError):
    """The port asked for is taken on this machine: nothing was started."""


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether binding `host:port` fails as the server's own bind would (uvicorn sets SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_port(port: int) -> None:
    """PortInUseError in one line naming the port and a free one to pass as --port."""
    if not 0 < port < 65536:
        raise PortInUseError(f"--port {port} is not a TCP port (1-65535)")
    if port_in_use(port):
        free = next((p for p in range(port + 1, min(port + 100, 65536)) if not port_in_use(p)), None)
        hint = f" (e.g. --port {free})" if free else ""
        raise PortInUseError(f"port {port} on {HOST} is in use (another Prefect server?): nothing was started; "
                             f"choose another port with --port{hint}")


class StopRequest:
    """Ctrl-C and SIGTERM, remembered rather than raised: starting and stopping are never cut short."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self.event.set()

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)


def _wait_ready(server: LocalPrefectServer, stop: StopRequest, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """Until the server answers (True) or a stop is asked (False); ServerStartError if it exits or
    does not answer in time."""
    assert server.process is not None
    deadline = time.monotonic() + timeout
    while not stop.event.is_set():
        if server.process.poll() is not None:
            raise ServerStartError(f"prefect server exited with {server.process.returncode}; see {server.log_path}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).is_success:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"prefect server did not answer within {timeout:.0f} s; see {server.log_path}")
        stop.event.wait(0.2)
    return False


def _announce(server: LocalPrefectServer, data: Path) -> None:
    print(f"Prefect server on the embedded PostgreSQL, data in {data}\n"
          f"UI: {server.url}\n"
          f"export PREFECT_API_URL={server.api_url}\n"
          f"Ctrl-C or SIGTERM stops it; the same command starts it again on the same data.", flush=True)


def serve_trial_server(data: Path = DEFAULT_DATA, port: int = DEFAULT_PORT) -> int:
    """Run the trial server until Ctrl-C or SIGTERM (0) or until it exits by itself (1).

    Raises PortInUseError (nothing started) or ServerStartError / PrefectDatabaseError (whatever
    was started is stopped again)."""
    check_port(port)
    data = data.resolve()
    stop = StopRequest()
    stop.install()
    server = LocalPrefectServer(data, database=POSTGRES, port=port)
    try:
        server.launch()
        if not _wait_ready(server, stop):
            print(f"{stop.signal_name}: stopping", flush=True)
            return 0
        _announce(server, data)
        while not stop.event.wait(0.5):
            assert server.process is not None
            if server.process.poll() is not None:
                print(f"prefect server exited with {server.process.returncode}; see {server.log_path}", flush=True)
                return 1
        print(f"{stop.signal_name}: stopping the Prefect server and its PostgreSQL", flush=True)
        return 0
    finally:
        server.stop()
