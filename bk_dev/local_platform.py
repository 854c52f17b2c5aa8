"""A `bk-server serve` process on loopback, driven through its admin API: the real platform
the demo, the benchmarks and the tests use for a while. With `ssl_certfile` and `ssl_keyfile`
among its options it serves HTTPS, and is itself reached with `ca_file`, the CA that signed the
certificate."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect_branchkey.bk_dev.processes import ServerStartError, spawn, stop_group, wait_until_answering
from prefect_branchkey.bk_server.admin_client import admin_call


@dataclass
class LocalServer:
    """A `bk-server serve` process on 127.0.0.1 keeping its state in `data_dir`."""

    data_dir: Path
    amqp_url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # 0 until the first start, when the server takes a free port itself; kept for restarts.
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None

    @property
    def tls(self) -> bool:
        """Whether the server serves HTTPS (its options name a certificate)."""
        return bool(self.options.get("ssl_certfile"))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How this process checks the server's certificate: against `ca_file` when given."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.tls and self.ca_file else True

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"bk-server-{self.data_dir.name}.log"

    @property
    def admin_file(self) -> Path:
        """Where the server writes its URL and admin token once it holds its port."""
        return self.data_dir / "admin.json"

    @property
    def admin_token(self) -> str:
        return json.loads(self.admin_file.read_text())["admin_token"]

    def start(self, timeout: float = 30) -> LocalServer:
        """Start the process and wait until it answers `/healthz`: on a free port it takes itself at
        the first start, on the same port at a restart."""
        command = [sys.executable, "-m", "prefect_branchkey.bk_server.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--log-level", "warning"]
        if self.amqp_url:
            command += ["--amqp-url", self.amqp_url]
        for key, value in self.options.items():
            flag = key.replace("_", "-")
            command += ([f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool)
                        else [f"--{flag}", str(value)])
        self.admin_file.unlink(missing_ok=True)
        self.process = spawn(command, self.log_path)
        deadline = time.monotonic() + timeout
        try:
            self.port = self._bound_port(deadline)
            wait_until_answering(self.process, f"{self.url}/healthz", max(1.0, deadline - time.monotonic()),
                                 self.log_path, "bk-server", verify=self.verify)
        except ServerStartError:
            self.stop(hard=True)
            raise
        return self

    def _bound_port(self, deadline: float) -> int:
        """The port named by the admin file the process writes once it holds it: until then,
        whatever answers on a port is not this server."""
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"bk-server exited with {self.process.returncode}; see {self.log_path}")
            if self.admin_file.exists():
                url = json.loads(self.admin_file.read_text())["url"]
                if (port := urlsplit(url).port) is None:
                    raise ServerStartError(f"bk-server's {self.admin_file} names no port in {url!r}")
                return port
            time.sleep(0.05)
        raise ServerStartError(f"bk-server did not bind its port in time; see {self.log_path}")

    def stop(self, hard: bool = False) -> None:
        if self.process is not None:
            stop_group(self.process, hard=hard)
        self.process = None

    def restart(self, hard: bool = True) -> None:
        self.stop(hard=hard)
        self.start()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return admin_call(self.url, self.admin_token, method, path, body, verify=self.verify)

    def create_federation(self, leaves: int, min_updates: int | None = None, **extra: Any) -> dict[str, Any]:
        """A tree, a branch with `leaves` leaves and a started run: ids and leaf credentials."""
        return self.admin("POST", "/federations", {"leaves": leaves, "min_updates": min_updates or leaves, **extra})

    def run(self, branch_id: str, action: str) -> dict[str, Any]:
        return self.admin("POST", f"/branches/{branch_id}/run/{action}")

    def status(self, branch_id: str) -> dict[str, Any]:
        return self.admin("GET", f"/branches/{branch_id}")
