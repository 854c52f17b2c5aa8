"""SQLite persistence of the platform's state: trees, branches, leaves, rounds, uploads,
aggregates, metrics and the notification outbox.

Every write is a short transaction, so a server killed at any moment restarts with
every accepted upload still counted.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS trees (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_id TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS branches (
    id TEXT PRIMARY KEY, tree_id TEXT NOT NULL REFERENCES trees(id), name TEXT NOT NULL,
    min_updates INTEGER NOT NULL, quorum INTEGER, round_deadline_s REAL,
    run_status TEXT NOT NULL, run_number INTEGER NOT NULL, round INTEGER NOT NULL,
    round_opened_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, tree_id TEXT NOT NULL, branch_id TEXT NOT NULL,
    owner_id TEXT NOT NULL, token_hash TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round INTEGER NOT NULL,
    status TEXT NOT NULL, signature TEXT, aggregation_id TEXT,
    opened_at REAL NOT NULL, closed_at REAL,
    PRIMARY KEY (branch_id, run_number, round)
);
CREATE TABLE IF NOT EXISTS uploads (
    file_id TEXT PRIMARY KEY, leaf_id TEXT NOT NULL, branch_id TEXT NOT NULL,
    run_number INTEGER NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL,
    weighting REAL NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL,
    metadata TEXT, idempotency_key TEXT, created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uploads_idempotency
    ON uploads (leaf_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS uploads_round ON uploads (branch_id, run_number, round, status);
CREATE TABLE IF NOT EXISTS aggregates (
    id TEXT PRIMARY KEY, branch_id TEXT NOT NULL, run_number INTEGER NOT NULL,
    round INTEGER NOT NULL, updates INTEGER NOT NULL, size INTEGER NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS aggregates_branch ON aggregates (branch_id, run_number, round);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, leaf_id TEXT NOT NULL, branch_id TEXT NOT NULL,
    tree_id TEXT NOT NULL, aggregation_id TEXT NOT NULL, mode TEXT NOT NULL, data TEXT NOT NULL,
    created_at REAL NOT NULL, idempotency_key TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tree_id TEXT NOT NULL, branch_id TEXT NOT NULL,
    body TEXT NOT NULL, created_at REAL NOT NULL
);
"""


_BRANCH_COLUMNS = ("id, tree_id, name, min_updates, quorum, round_deadline_s, run_status, run_number, round, "
                   "round_opened_at, created_at, updated_at")


@dataclass(frozen=True)
class Branch:
    id: str
    tree_id: str
    name: str
    min_updates: int
    quorum: int | None
    round_deadline_s: float | None
    run_status: str
    run_number: int
    round: int
    round_opened_at: float
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Leaf:
    id: str
    name: str
    tree_id: str
    branch_id: str
    owner_id: str
    token_hash: str
    created_at: float


@dataclass(frozen=True)
class Upload:
    file_id: str
    leaf_id: str
    branch_id: str
    run_number: int
    round: int
    status: str
    weighting: float
    size: int
    digest: str
    metadata: str | None
    idempotency_key: str | None
    created_at: float
    kind: str = "federated_learning"


@dataclass(frozen=True)
class Round:
    branch_id: str
    run_number: int
    round: int
    status: str
    signature: str | None
    aggregation_id: str | None
    opened_at: float
    closed_at: float | None
    analytics_schema: str | None = None


@dataclass(frozen=True)
class Aggregate:
    id: str
    branch_id: str
    run_number: int
    round: int
    updates: int
    size: int
    created_at: float
    kind: str = "federated_learning"


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    tree_id: str
    branch_id: str
    body: str


class Store:
    """A thread-safe handle on the server's SQLite database."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database written by an earlier version up to this schema."""
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(metrics)")}
        if "idempotency_key" not in columns:
            self._conn.execute("ALTER TABLE metrics ADD COLUMN idempotency_key TEXT")
        self._conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS metrics_idempotency "
                           "ON metrics (leaf_id, idempotency_key) WHERE idempotency_key IS NOT NULL")
        self._add_column("uploads", "kind", "TEXT NOT NULL DEFAULT 'federated_learning'")
        self._add_column("aggregates", "kind", "TEXT NOT NULL DEFAULT 'federated_learning'")
        self._add_column("rounds", "analytics_schema", "TEXT")
        self._add_column("branches", "field_operations", "TEXT")

    def _add_column(self, table: str, column: str, declaration: str) -> None:
        """Add a column the analytics payloads need, unless the table has it already."""
        if column not in {row["name"] for row in self._conn.execute(f"PRAGMA table_info({table})")}:
            self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _one(self, cls: type, sql: str, *args: Any) -> Any:
        with self._lock:
            row = self._conn.execute(sql, args).fetchone()
        return None if row is None else cls(**dict(row))

    def _all(self, cls: type, sql: str, *args: Any) -> list[Any]:
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [cls(**dict(row)) for row in rows]

    def leaf(self, leaf_id: str) -> Leaf | None:
        return self._one(Leaf, "SELECT * FROM leaves WHERE id = ?", leaf_id)

    def leaves_of_branch(self, branch_id: str) -> list[Leaf]:
        return self._all(Leaf, "SELECT * FROM leaves WHERE branch_id = ? ORDER BY created_at, name", branch_id)

    def branch(self, branch_id: str) -> Branch | None:
        return self._one(Branch, f"SELECT {_BRANCH_COLUMNS} FROM branches WHERE id = ?", branch_id)

    def branches(self) -> list[Branch]:
        return self._all(Branch, f"SELECT {_BRANCH_COLUMNS} FROM branches ORDER BY created_at")

    def field_operations(self, branch_id: str) -> str | None:
        """The branch's analytics field operations, as JSON text (None when none were assigned)."""
        with self._lock:
            row = self._conn.execute("SELECT field_operations FROM branches WHERE id = ?", (branch_id,)).fetchone()
        return None if row is None else row["field_operations"]

    def set_field_operations(self, branch_id: str, operations: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE branches SET field_operations=?, updated_at=? WHERE id=?",
                       (operations, time.time(), branch_id))

    def round(self, branch_id: str, run_number: int, round_number: int) -> Round | None:
        return self._one(
            Round,
            "SELECT * FROM rounds WHERE branch_id = ? AND run_number = ? AND round = ?",
            branch_id, run_number, round_number,
        )

    def rounds_with_status(self, status: str) -> list[Round]:
        return self._all(Round, "SELECT * FROM rounds WHERE status = ? ORDER BY opened_at", status)

    def rounds_of_branch(self, branch_id: str) -> list[Round]:
        return self._all(Round, "SELECT * FROM rounds WHERE branch_id = ? ORDER BY run_number, round", branch_id)

    def upload(self, file_id: str) -> Upload | None:
        return self._one(Upload, "SELECT * FROM uploads WHERE file_id = ?", file_id)

    def upload_by_key(self, leaf_id: str, key: str) -> Upload | None:
        return self._one(Upload, "SELECT * FROM uploads WHERE leaf_id = ? AND idempotency_key = ? "
                                 "AND status = 'accepted'", leaf_id, key)

    def accepted_uploads(self, branch_id: str, run_number: int, round_number: int) -> list[Upload]:
        return self._all(
            Upload,
            "SELECT * FROM uploads WHERE branch_id = ? AND run_number = ? AND round = ? AND status = 'accepted' "
            "ORDER BY created_at, file_id",
            branch_id, run_number, round_number,
        )

    def aggregate(self, aggregation_id: str) -> Aggregate | None:
        return self._one(Aggregate, "SELECT * FROM aggregates WHERE id = ?", aggregation_id)

    def aggregating_rounds(self, branch_id: str, run_number: int) -> list[int]:
        """The run's rounds closed and not yet aggregated (FedAvg running, or to be redone)."""
        with self._lock:
            rows = self._conn.execute("SELECT round FROM rounds WHERE branch_id = ? AND run_number = ? AND "
                                      "status = 'aggregating' ORDER BY round", (branch_id, run_number)).fetchall()
        return [row["round"] for row in rows]

    def latest_aggregate(self, branch_id: str, kind: str = "federated_learning") -> Aggregate | None:
        """The branch's most recent aggregate of a payload kind (models by default: a combined
        statistics result is no model to resync to), by run and round."""
        return self._one(Aggregate, "SELECT * FROM aggregates WHERE branch_id = ? AND kind = ? "
                                    "ORDER BY run_number DESC, round DESC LIMIT 1", branch_id, kind)

    def metrics_of_branch(self, branch_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT leaf_id, aggregation_id, mode, data, created_at FROM metrics WHERE branch_id = ? ORDER BY id",
                (branch_id,),
            ).fetchall()
        return [dict(row) | {"data": json.loads(row["data"])} for row in rows]

    def add_metrics(self, leaf: Leaf, aggregation_id: str, mode: str, data: str,
                    idempotency_key: str | None = None) -> bool:
        """Store a leaf's metrics; False (and nothing stored) when its idempotency key was seen."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO metrics (leaf_id, branch_id, tree_id, aggregation_id, mode, data, created_at, "
                "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (leaf.id, leaf.branch_id, leaf.tree_id, aggregation_id, mode, data, time.time(), idempotency_key),
            )
        return cursor.rowcount == 1

    # -- writes inside the caller's transaction (`with store.transaction() as db:`), so that a
    # -- change and the notification announcing it commit together ---------------------------

    @staticmethod
    def insert_federation(db: sqlite3.Connection, tree: tuple[str, str, str], branch: tuple[str, str],
                          rules: tuple[int, int | None, float | None], leaves: list[tuple[str, str, str]],
                          now: float) -> None:
        """A tree (id, name, owner), its branch (id, name) with its round rules (min_updates,
        quorum, deadline) and run stopped, and its leaves (id, name, token hash)."""
        tree_id, tree_name, owner = tree
        db.execute("INSERT INTO trees VALUES (?, ?, ?, ?)", (tree_id, tree_name, owner, now))
        db.execute(f"INSERT INTO branches ({_BRANCH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'stop', 0, 0, ?, ?, ?)",
                   (branch[0], tree_id, branch[1], *rules, now, now, now))
        db.executemany("INSERT INTO leaves VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(leaf_id, name, tree_id, branch[0], owner, token_hash, now)
                        for leaf_id, name, token_hash in leaves])

    @staticmethod
    def begin_run(db: sqlite3.Connection, branch_id: str, run_number: int, now: float) -> None:
        """Start run `run_number` of the branch at round 1, with that round open."""
        db.execute("UPDATE branches SET run_status='start', run_number=?, round=1, round_opened_at=?, updated_at=? "
                   "WHERE id=?", (run_number, now, now, branch_id))
        db.execute("INSERT INTO rounds (branch_id, run_number, round, status, opened_at) VALUES (?, ?, 1, 'open', ?)",
                   (branch_id, run_number, now))

    @staticmethod
    def stop_run(db: sqlite3.Connection, branch: Branch, now: float) -> None:
        """Stop the branch's run: its open round is abandoned and that round's updates discarded."""
        where = (branch.id, branch.run_number, branch.round)
        db.execute("UPDATE rounds SET status='abandoned', closed_at=? WHERE branch_id=? AND run_number=? AND round=? "
                   "AND status='open'", (now, *where))
        db.execute("UPDATE uploads SET status='discarded', idempotency_key=NULL "
                   "WHERE branch_id=? AND run_number=? AND round=? AND status='accepted'", where)
        Store.set_run_status(db, branch.id, "stop", now)

    @staticmethod
    def set_run_status(db: sqlite3.Connection, branch_id: str, status: str, now: float) -> None:
        db.execute("UPDATE branches SET run_status=?, updated_at=? WHERE id=?", (status, now, branch_id))

    @staticmethod
    def run_number_of(db: sqlite3.Connection, branch_id: str) -> int:
        return db.execute("SELECT run_number FROM branches WHERE id=?", (branch_id,)).fetchone()[0]

    @staticmethod
    def insert_upload(db: sqlite3.Connection, upload: Upload, signature: str, replaced: list[str],
                      analytics_schema: str | None = None) -> None:
        """Count an accepted update in its round (which takes the update's layer signature, or for a
        statistics payload its fields); the leaf's earlier updates to that round (`replaced` file
        ids) no longer count."""
        db.executemany("UPDATE uploads SET status='superseded', idempotency_key=NULL WHERE file_id=?",
                       [(file_id,) for file_id in replaced])
        db.execute("INSERT INTO uploads (file_id, leaf_id, branch_id, run_number, round, status, weighting, size, "
                   "digest, metadata, idempotency_key, created_at, kind) "
                   "VALUES (?, ?, ?, ?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?)",
                   (upload.file_id, upload.leaf_id, upload.branch_id, upload.run_number, upload.round,
                    upload.weighting, upload.size, upload.digest, upload.metadata, upload.idempotency_key,
                    upload.created_at, upload.kind))
        where = (upload.branch_id, upload.run_number, upload.round)
        if analytics_schema is None:
            db.execute("UPDATE rounds SET signature=? WHERE branch_id=? AND run_number=? AND round=?",
                       (signature, *where))
        else:
            db.execute("UPDATE rounds SET analytics_schema=? WHERE branch_id=? AND run_number=? AND round=?",
                       (analytics_schema, *where))

    @staticmethod
    def close_round(db: sqlite3.Connection, branch: Branch, aggregation_id: str, now: float) -> None:
        """Close the branch's open round for aggregation as `aggregation_id` and open the next one,
        which keeps the closed round's layer signature."""
        where = (branch.id, branch.run_number, branch.round)
        db.execute("UPDATE rounds SET status='aggregating', aggregation_id=?, closed_at=? "
                   "WHERE branch_id=? AND run_number=? AND round=?", (aggregation_id, now, *where))
        db.execute("INSERT INTO rounds (branch_id, run_number, round, status, signature, opened_at, analytics_schema) "
                   "SELECT branch_id, run_number, round + 1, 'open', signature, ?, analytics_schema "
                   "FROM rounds WHERE branch_id=? AND run_number=? AND round=?", (now, *where))
        db.execute("UPDATE branches SET round=?, round_opened_at=?, updated_at=? WHERE id=?",
                   (branch.round + 1, now, now, branch.id))

    @staticmethod
    def record_aggregate(db: sqlite3.Connection, aggregate: Aggregate) -> None:
        """The aggregate of a round is written: store it and mark its round aggregated."""
        db.execute("INSERT OR REPLACE INTO aggregates (id, branch_id, run_number, round, updates, size, created_at, "
                   "kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (aggregate.id, aggregate.branch_id, aggregate.run_number, aggregate.round, aggregate.updates,
                    aggregate.size, aggregate.created_at, aggregate.kind))
        db.execute("UPDATE rounds SET status='aggregated' WHERE branch_id=? AND run_number=? AND round=?",
                   (aggregate.branch_id, aggregate.run_number, aggregate.round))

    def fail_round(self, branch_id: str, run_number: int, round_number: int) -> None:
        """The round's aggregation failed for good: it closes without an aggregate."""
        with self.transaction() as db:
            db.execute("UPDATE rounds SET status='failed' WHERE branch_id=? AND run_number=? AND round=?",
                       (branch_id, run_number, round_number))

    def outbox(self, limit: int = 100) -> list[OutboxMessage]:
        return self._all(OutboxMessage, "SELECT id, tree_id, branch_id, body FROM outbox ORDER BY id LIMIT ?", limit)


    @staticmethod
    def insert_outbox(db: sqlite3.Connection, tree_id: str, branch_id: str, body: str) -> None:
        """Queue a notification inside the caller's transaction: it commits with the change it
        announces, or not at all."""
        db.execute("INSERT INTO outbox (tree_id, branch_id, body, created_at) VALUES (?, ?, ?, ?)",
                   (tree_id, branch_id, body, time.time()))

    def remove_outbox(self, message_id: int) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
