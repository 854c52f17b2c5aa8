"""A real `bk-server serve` process on 127.0.0.1 for tests, with its admin API at hand."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_ADMIN = "http://127.0.0.1:15672"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Federation:
    """What `federation create` returned: ids and one credentials dict per leaf."""

    tree_id: str
    branch_id: str
    leaves: list[dict[str, str]]


@dataclass
class BkServer:
    """Start, restart and stop a bk_server process; call its admin API."""

    data_dir: Path
    amqp: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    federations: list[Federation] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return json.loads((self.data_dir / "admin.json").read_text())["admin_token"]

    def start(self) -> "BkServer":
        command = [sys.executable, "-m", "bk_server.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--log-level", "warning"]
        if self.amqp:
            command += ["--amqp-url", AMQP_URL, "--rabbitmq-admin-url", "http://guest:guest@127.0.0.1:15672"]
        for key, value in self.options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        log = open(self.data_dir.parent / f"bk-server-{self.port}.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bk-server exited with {self.process.returncode}; see {log.name}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("bk-server did not answer /healthz within 30 s")

    def stop(self, hard: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self, hard: bool = True) -> None:
        self.stop(hard=hard)
        self.start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def admin(self, method: str, path: str, body: dict | None = None) -> Any:
        response = requests.request(method, f"{self.url}/admin/v1{path}", json=body,
                                    headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=60)
        assert response.status_code < 400, response.text
        return response.json()["data"]

    def federation(self, leaves: int = 3, min_updates: int | None = None, **extra: Any) -> Federation:
        body = {"leaves": leaves, "min_updates": min_updates or leaves, **extra}
        data = self.admin("POST", "/federations", body)
        federation = Federation(data["tree_id"], data["branch_id"], data["leaves"])
        self.federations.append(federation)
        return federation

    def run(self, branch_id: str, action: str) -> dict[str, Any]:
        return self.admin("POST", f"/branches/{branch_id}/run/{action}")

    def status(self, branch_id: str) -> dict[str, Any]:
        return self.admin("GET", f"/branches/{branch_id}")

    def wait_for_round(self, branch_id: str, round_number: int, timeout: float = 30) -> dict[str, Any]:
        """Poll the admin API until a round is aggregated; return that round."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.status(branch_id)["rounds"]:
                if r["round"] == round_number and r["status"] == "aggregated":
                    return r
            time.sleep(0.05)
        raise TimeoutError(f"round {round_number} of {branch_id} not aggregated within {timeout} s")

    def cleanup_broker(self) -> None:
        """Remove the vhosts and leaf users this server's federations created."""
        for federation in self.federations:
            requests.delete(f"{RABBIT_ADMIN}/api/vhosts/{federation.tree_id}", auth=("guest", "guest"), timeout=10)
            for leaf in federation.leaves:
                requests.delete(f"{RABBIT_ADMIN}/api/users/{leaf['id']}", auth=("guest", "guest"), timeout=10)

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident set (VmHWM) so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found")


def broker_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            pass
        return requests.get(f"{RABBIT_ADMIN}/api/overview", auth=("guest", "guest"), timeout=2).ok
    except (OSError, requests.RequestException):
        return False


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
