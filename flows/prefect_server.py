"""A Prefect server of our own on loopback (`prefect server start`, SQLite in its own home).

What the demo shows its dashboard on, and what the end-to-end test deploys to: a real
server with the UI, on a free port, quiet and offline, stopped with everything it started.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from bk_server.process import ServerStartError, free_port, spawn, stop_group, wait_until_answering

# `prefect server start` takes about 25 s to answer here; give it room on a loaded machine.
STARTUP_TIMEOUT_S = 120


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
        """Wait until `/api/health` answers; stop the server and raise ServerStartError if it does not."""
        assert self.process is not None, "launch() first"
        try:
            wait_until_answering(self.process, f"{self.api_url}/health", timeout, self.log_path, "prefect server")
        except ServerStartError:
            self.stop()
            raise
        return self

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
