"""Run `bk-server serve` as a subprocess on loopback and drive its admin API.

What the demo, the benchmarks and the tests use to get a real platform for a while.
Its children never outlive it: each gets its own process group (stopping it stops what
it started, and a terminal's Ctrl-C reaches only the parent, which then stops the
children in order) and asks the kernel for SIGTERM should the parent die uncleanly.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


PR_SET_PDEATHSIG = 1
# Looked up once here: the child runs between fork and exec, where loading a library is unsafe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with(parent: int) -> Callable[[], None]:
    """What the child runs before exec: ask for SIGTERM when the parent dies, and exit at
    once if it died already (between the fork and this call)."""

    def arrange() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arrange


def spawn(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, user: str | None = None) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, output appended to `log_path` (as `user`, with
    that user's group, when given: root starting a server that refuses root)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                user=user, group=user, extra_groups=[] if user else None,
                                preexec_fn=_die_with(os.getpid()))


def stop_group(process: subprocess.Popen[bytes], timeout: float = 20, hard: bool = False) -> None:
    """SIGTERM the child's process group (unless `hard`); after `timeout` seconds (or once
    the child has exited) SIGKILL whatever of the group is left."""
    if not hard:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


class ServerStartError(RuntimeError):
    """A server process exited, or did not answer, before it was ready."""


def wait_until_answering(process: subprocess.Popen[bytes], url: str, timeout: float, log_path: Path,
                         what: str) -> None:
    """Poll `url` until it answers 2xx; ServerStartError if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"{what} exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url, timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise ServerStartError(f"{what} did not answer {url} within {timeout:.0f} s; see {log_path}")


class AdminCallError(RuntimeError):
    """The admin API could not be reached or refused the call."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_available(host: str = "127.0.0.1") -> bool:
    """Whether RabbitMQ answers on 5672 and its management API (guest) on 15672."""
    try:
        with socket.create_connection((host, 5672), timeout=1):
            pass
        return httpx.get(f"http://{host}:15672/api/overview", auth=("guest", "guest"), timeout=2).is_success
    except (OSError, httpx.HTTPError):
        return False


def admin_call(base_url: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call `/admin/v1<path>` and return its `data`, or raise AdminCallError with the server's message."""
    url = f"{base_url.rstrip('/')}/admin/v1{path}"
    try:
        response = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    except httpx.HTTPError as exc:
        raise AdminCallError(f"cannot reach the server at {base_url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise AdminCallError(f"server refused ({response.status_code}): {message}")
    return response.json()["data"]


@dataclass
class LocalServer:
    """A `bk-server serve` process on 127.0.0.1 keeping its state in `data_dir`."""

    data_dir: Path
    amqp_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"bk-server-{self.port}.log"

    @property
    def admin_token(self) -> str:
        return json.loads((self.data_dir / "admin.json").read_text())["admin_token"]

    def start(self, timeout: float = 30) -> "LocalServer":
        """Start the process and wait until it answers `/healthz`."""
        command = [sys.executable, "-m", "bk_server.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--log-level", "warning"]
        if self.amqp_url:
            command += ["--amqp-url", self.amqp_url]
        for key, value in self.options.items():
            flag = key.replace("_", "-")
            command += ([f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool)
                        else [f"--{flag}", str(value)])
        self.process = spawn(command, self.log_path)
        try:
            wait_until_answering(self.process, f"{self.url}/healthz", timeout, self.log_path, "bk-server")
        except ServerStartError:
            self.stop(hard=True)
            raise
        return self

    def stop(self, hard: bool = False) -> None:
        if self.process is not None:
            stop_group(self.process, hard=hard)
        self.process = None

    def restart(self, hard: bool = True) -> None:
        self.stop(hard=hard)
        self.start()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return admin_call(self.url, self.admin_token, method, path, body)

    def create_federation(self, leaves: int, min_updates: int | None = None, **extra: Any) -> dict[str, Any]:
        """A tree, a branch with `leaves` leaves and a started run: ids and leaf credentials."""
        return self.admin("POST", "/federations", {"leaves": leaves, "min_updates": min_updates or leaves, **extra})

    def run(self, branch_id: str, action: str) -> dict[str, Any]:
        return self.admin("POST", f"/branches/{branch_id}/run/{action}")

    def status(self, branch_id: str) -> dict[str, Any]:
        return self.admin("GET", f"/branches/{branch_id}")
