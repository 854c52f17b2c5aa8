"""A Prefect server of our own on loopback (`prefect server start`, SQLite in its own home).

What the demo shows its dashboard on, and what the end-to-end test deploys to: a real
server with the UI, on a free port, quiet and offline, stopped with everything it started.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import httpx

from bk_server.process import free_port, spawn, stop_group

# `prefect server start` takes about 25 s to answer here; give it room on a loaded machine.
STARTUP_TIMEOUT_S = 120


class PrefectServerError(RuntimeError):
    """The local Prefect server did not start."""


@dataclass
class LocalPrefectServer:
    """`prefect server start` on 127.0.0.1 with `home` as its PREFECT_HOME (database, logs)."""

    home: Path
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)
    process: Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def client_env(self) -> dict[str, str]:
        """The environment for a process that talks to this server (a worker, `prefect deploy`)."""
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **self.settings}

    def launch(self) -> "LocalPrefectServer":
        """Start the server process without waiting for it (it takes ~25 s to answer)."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.client_env() | {"PREFECT_UI_API_URL": self.api_url}
        env.pop("PREFECT_API_URL")
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.process = spawn(command, self.log_path, env=env)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "LocalPrefectServer":
        """Wait until `/api/health` answers; stop the server and raise if it does not in time."""
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrefectServerError(f"prefect server exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).is_success:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise PrefectServerError(f"prefect server did not answer within {timeout:.0f} s; see {self.log_path}")

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "LocalPrefectServer":
        """Start the server and wait until it answers."""
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None

    def __enter__(self) -> "LocalPrefectServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
