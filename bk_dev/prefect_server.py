"""A Prefect server of our own on loopback (`prefect server start` in its own home), on PostgreSQL.

What the demo shows its dashboard on, what the benchmarks and the end-to-end tests run
against: a real server with the UI, on a free port, quiet and offline, stopped with
everything it started. Its database is an embedded PostgreSQL in its home by default
(`prefect_branchkey.bk_dev.prefect_database`); `sqlite` or a URL of the user's own may be chosen instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from prefect_branchkey.bk_dev.prefect_database import POSTGRES, SQLITE, EmbeddedPostgres, check_database_url, redacted
from prefect_branchkey.bk_dev.processes import ServerStartError, free_port, spawn, stop_group, wait_until_answering

# `prefect server start` takes 8 s (PostgreSQL) to 25 s (SQLite) to answer here; room for a loaded machine.
STARTUP_TIMEOUT_S = 120
URL_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
# Our servers run without CSRF protection (Prefect's default, set explicitly), so clients need not
# ask each new connection for a token: that request answered 422 once per client, a few times a round.
CLIENT_SETTINGS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false"}


def default_database() -> str:
    """The user's database URL when the environment sets one, else the embedded PostgreSQL."""
    return next((os.environ[name] for name in URL_SETTINGS if os.environ.get(name)), POSTGRES)


def describe_database(choice: str) -> str:
    """How a database choice reads in messages (a URL without its password)."""
    return {POSTGRES: "embedded PostgreSQL", SQLITE: "SQLite"}.get(choice) or redacted(choice)


@dataclass
class LocalPrefectServer:
    """`prefect server start` on 127.0.0.1 with `home` as its PREFECT_HOME (logs, database).

    `database` is `postgres` (an embedded PostgreSQL in `home/postgres`), `sqlite`
    (Prefect's default file in `home`) or a SQLAlchemy URL of an existing database.
    """

    home: Path
    database: str = field(default_factory=default_database, repr=False)
    port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)
    process: Popen[bytes] | None = None
    postgres: EmbeddedPostgres | None = None

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
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url, **CLIENT_SETTINGS,
               **self.settings}
        for name in URL_SETTINGS:
            env.pop(name, None)
        return env

    def _start_database(self) -> str:
        """Start the embedded PostgreSQL if chosen (else check the URL); the URL the server is given."""
        if self.database == POSTGRES:
            self.postgres = EmbeddedPostgres(self.home / "postgres" / "data").start()
            return self.postgres.url
        if self.database == SQLITE:
            return f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"
        check_database_url(self.database)
        return self.database

    def launch(self) -> LocalPrefectServer:
        """Start the database and the server process without waiting for the server (it takes
        seconds to answer). Raises PrefectDatabaseError, with nothing left running, if the
        database cannot start."""
        self.home.mkdir(parents=True, exist_ok=True)
        url = self._start_database()
        env = self.client_env() | {"PREFECT_UI_API_URL": self.api_url, "PREFECT_SERVER_DATABASE_CONNECTION_URL": url,
                                   "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "false"}
        env.pop("PREFECT_API_URL")
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        try:
            self.process = spawn(command, self.log_path, env=env)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> LocalPrefectServer:
        """Wait until `/api/health` answers; stop everything and raise ServerStartError if it does not."""
        assert self.process is not None, "launch() first"
        try:
            wait_until_answering(self.process, f"{self.api_url}/health", timeout, self.log_path, "prefect server")
        except ServerStartError:
            self.stop()
            raise
        return self

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> LocalPrefectServer:
        """Start the database and the server and wait until it answers."""
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        """Stop the server, then its embedded database. Idempotent."""
        try:
            if self.process is not None:
                stop_group(self.process)
                self.process = None
        finally:
            if self.postgres is not None:
                self.postgres.stop()
                self.postgres = None

    def __enter__(self) -> LocalPrefectServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
