"""A real `mlflow server` for the registry tests: SQLite backend store, artifacts served from a local
directory, one worker, on 127.0.0.1; with `auth`, behind MLflow's basic auth (user `admin`,
`ADMIN_PASSWORD`), which checks a password hash on every request (seconds per registration)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from prefect_branchkey.bk_dev.processes import free_port, spawn, stop_group, wait_until_answering

START_TIMEOUT_S = 120
ADMIN_USER = "admin"
ADMIN_PASSWORD = "registry-admin-pw-4f1c"


@dataclass
class MlflowServer:
    """`mlflow server` in `root`, on `port` (a free one unless given), until `stop()`."""

    root: Path
    auth: bool = False
    port: int = field(default_factory=free_port)
    process: Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "mlflow-server.log"

    def start(self) -> MlflowServer:
        """Start the server and wait until it answers its health check."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("mlflow")), "server", *(("--app-name", "basic-auth") * self.auth),
                   "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
        # Without MLflow's job runner (GenAI jobs, not the model registry): its processes cost
        # seconds of CPU to start and outlived SIGTERM until stop_group's SIGKILL, 10 s later.
        env = os.environ | {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": "registry-tests-csrf-key",
                            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = spawn(command, self.log_path, env=env, cwd=self.root)
        try:
            wait_until_answering(self.process, f"{self.url}/health", START_TIMEOUT_S, self.log_path, "mlflow server")
        except Exception:
            print(self.log_tail())
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, timeout=10)
            self.process = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for a failing test's output."""
        if not self.log_path.exists():
            return "(no mlflow server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
