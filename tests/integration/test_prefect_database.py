"""The Prefect servers' database: the embedded PostgreSQL starts, stops, dies with its parent,
refuses a directory it cannot use with the reason, a wrong URL is one clear line, and a
database killed mid-round costs no update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from prefect_branchkey.bk_blocks import BranchKeyClient
from prefect_branchkey.bk_blocks.archive import read_update
from prefect_branchkey.bk_dev.prefect_database import (
    EmbeddedPostgres,
    PrefectDatabaseError,
    check_database_url,
    installed_version,
)
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.state import load_state

from ..support.bkserver import BkServer, credentials_for

PROJECT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_embedded_postgres_serves_the_prefect_database_with_pg_trgm(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "data") as postgres:
        check_database_url(postgres.url)
        assert "pg_trgm" in postgres._psql("SELECT extname FROM pg_extension", database="prefect")
        assert (tmp_path / "data" / "PG_VERSION").read_text().strip() == installed_version()


def test_stop_leaves_no_postgres_process(tmp_path: Path) -> None:
    postgres = EmbeddedPostgres(tmp_path / "data").start()
    assert postgres.process is not None
    pid = postgres.process.pid
    postgres.stop()
    assert _gone(pid)
    assert not (tmp_path / "data" / "postmaster.pid").exists(), "a clean shutdown removes its lock"


def test_postgres_dies_with_a_parent_that_is_sigkilled(tmp_path: Path) -> None:
    script = ("import sys, time; from pathlib import Path; "
              "from prefect_branchkey.bk_dev.prefect_database import EmbeddedPostgres; "
              "p = EmbeddedPostgres(Path(sys.argv[1])).start(); print(p.process.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], cwd=PROJECT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _gone(pid), "the postmaster outlived its parent"
    finally:
        parent.kill()


def test_data_directory_in_use_is_refused_naming_the_running_server(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "data") as first:
        assert first.process is not None
        with pytest.raises(PrefectDatabaseError, match=rf"in use by a running PostgreSQL \(pid {first.process.pid}\)"):
            EmbeddedPostgres(tmp_path / "data").start()
        check_database_url(first.url)


def test_stale_lock_of_a_killed_server_does_not_block_a_restart(tmp_path: Path) -> None:
    crashed = EmbeddedPostgres(tmp_path / "data").start()
    crashed.kill()
    assert (tmp_path / "data" / "postmaster.pid").exists()
    with EmbeddedPostgres(tmp_path / "data") as restarted:
        check_database_url(restarted.url)


def test_data_directory_of_another_postgres_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    with pytest.raises(PrefectDatabaseError, match=rf"PostgreSQL 15 database; the embedded server is PostgreSQL "
                                                   rf"{installed_version()}: remove the directory"):
        EmbeddedPostgres(data).start()


def test_directory_holding_other_files_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    with pytest.raises(PrefectDatabaseError, match="not empty and is not a PostgreSQL data directory"):
        EmbeddedPostgres(data).start()
    assert (data / "notes.txt").read_text() == "mine"


def test_wrong_database_url_is_one_line_naming_it_without_its_password() -> None:
    with pytest.raises(PrefectDatabaseError) as error:
        check_database_url("postgresql+asyncpg://prefect:s3cret@127.0.0.1:1/prefect", timeout=5)
    message = str(error.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("cannot connect to the Prefect database postgresql+asyncpg://prefect:***@127.0.0.1:1/")
    assert "refused" in message.lower() or "connect call failed" in message.lower()


def test_prefect_server_with_a_wrong_database_url_starts_nothing(tmp_path: Path) -> None:
    server = LocalPrefectServer(tmp_path / "home", database="postgresql+asyncpg://prefect:pw@127.0.0.1:1/prefect")
    with pytest.raises(PrefectDatabaseError, match="cannot connect to the Prefect database"):
        server.start()
    assert server.process is None and server.postgres is None


def test_prefect_server_whose_database_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "postgres" / "data").mkdir(parents=True)
    (home / "postgres" / "data" / "PG_VERSION").write_text("15\n")
    server = LocalPrefectServer(home)
    with pytest.raises(PrefectDatabaseError, match="PostgreSQL 15 database"):
        server.start()
    assert server.process is None and server.postgres is None


@pytest.mark.e2e
def test_sqlite_stays_available_as_an_explicit_choice(tmp_path: Path) -> None:
    with LocalPrefectServer(tmp_path / "home", database="sqlite") as server:
        created = httpx.post(f"{server.api_url}/flows/", json={"name": "sqlite-check"}, timeout=30)
        assert created.is_success, created.text
        assert (tmp_path / "home" / "prefect.db").exists() and not (tmp_path / "home" / "postgres").exists()


def test_prefect_server_stop_stops_its_postgres(tmp_path: Path) -> None:
    server = LocalPrefectServer(tmp_path / "home", database="postgres").start()
    assert server.postgres is not None and server.postgres.process is not None
    pids = [server.postgres.process.pid, server.process.pid if server.process else 0]
    health = httpx.get(f"{server.api_url}/health", timeout=10)
    assert health.is_success
    server.stop()
    assert all(_gone(pid) for pid in pids)


@pytest.mark.e2e
@pytest.mark.rabbitmq
def test_database_killed_mid_round_loses_no_update_and_counts_none_twice(
        tmp_path: Path, rabbitmq: None, make_server: Callable[..., BkServer]) -> None:
    """The Prefect server's PostgreSQL is SIGKILLed while a leaf waits for its round's aggregation,
    and restarted seconds later. The leaf's run may fail meanwhile (Prefect's API answers 500);
    rerun, it resumes from its work dir. Every round completes once, and the platform counts
    each leaf's update once per round."""
    server = make_server(amqp=True)
    federation = server.federation(leaves=2, min_updates=2)
    leaf, other = federation.leaves
    credentials = tmp_path / "leaf.json"
    credentials.write_text(json.dumps(leaf))
    work_dir = tmp_path / "leaf"
    with LocalPrefectServer(tmp_path / "prefect", database="postgres") as prefect, \
            credentials_for(server, other, "amqp").get_client() as other_client:
        assert prefect.postgres is not None
        leaf_runs = LeafRuns(credentials, server.url, work_dir, prefect.client_env(), tmp_path / "logs")
        try:
            leaf_runs.until_phase(leaf["id"], 1, "uploaded")
            prefect.postgres.kill()
            _upload_like_the_leaf(other_client, work_dir, 1)
            time.sleep(3)
            prefect.postgres.start()
            leaf_runs.until_phase(leaf["id"], 2, "uploaded")
            _upload_like_the_leaf(other_client, work_dir, 2)
            leaf_runs.until_done()
        finally:
            leaf_runs.kill()
    rows = history_rows(work_dir)
    assert [(r["round"], r["status"]) for r in rows] == [(1, "completed"), (2, "completed")]
    rounds = server.status(federation.branch_id)["rounds"]
    assert [(r["round"], r["status"], r["updates"], r["leaves"]) for r in rounds] == [
        *((n, "aggregated", 2, sorted([leaf["id"], other["id"]])) for n in (1, 2)), (3, "open", 0, [])]
    assert [r["aggregation_id"] for r in rows] == [r["aggregation_id"] for r in rounds[:2]]


class LeafRuns:
    """A leaf's `federated-training` process (2 rounds, AMQP), started again whenever a run fails;
    each run's output goes to a file of its own under `logs`."""

    def __init__(self, credentials: Path, host: str, work_dir: Path, env: dict[str, str], logs: Path,
                 reruns: int = 3) -> None:
        self.command = [sys.executable, "-m", "tests.support.leaf_process", str(credentials), host, "amqp",
                        str(work_dir), "2"]
        self.work_dir, self.env, self.logs, self.reruns = work_dir, env, logs, reruns
        self.failures: list[Path] = []
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log = self.logs / f"run-{len(self.failures) + 1}.log"
        with open(self.log, "wb") as out:
            return subprocess.Popen(self.command, cwd=PROJECT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def _errors(self) -> str:
        return "\n---\n".join(path.read_text(errors="replace")[-3000:] for path in self.failures)

    def _restart_if_failed(self) -> bool:
        """Start a new run if the last one failed; False once a run ended well."""
        if self.process.poll() is None:
            return True
        if self.process.returncode == 0:
            return False
        self.failures.append(self.log)
        assert len(self.failures) <= self.reruns, self._errors()
        self.process = self._start()
        return True

    def until_phase(self, leaf_id: str, round_number: int, phase: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.work_dir / "state.json").exists():
                state = load_state(self.work_dir, leaf_id)
                if (state.round, state.phase) == (round_number, phase) or state.round > round_number:
                    return
            self._restart_if_failed()
            time.sleep(0.05)
        raise TimeoutError(f"leaf never reached round {round_number} phase {phase}: {self._errors()}")

    def until_done(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self._restart_if_failed():
            assert time.monotonic() < deadline, f"leaf not done in {timeout} s: {self._errors()}"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def _upload_like_the_leaf(client: BranchKeyClient, work_dir: Path, round_number: int) -> None:
    """The other leaf's update for a round: the first leaf's layers, so the layouts match."""
    _, layers = read_update(work_dir / "updates" / f"run1-round{round_number}.npz")
    path = client.write_update(work_dir.parent / f"other-round{round_number}.npz", 10.0, layers)
    client.upload(path, idempotency_key=f"other-round-{round_number}")
