"""Publishing a leaf's recorded rounds to Prefect off the round's path: artifacts and round events.

A round is done once its history row is on disk. What Prefect shows of it (the leaf's history
and summary artifacts, the `branchkey.round.completed` event) is derived from that row and
sent by a background thread, so the leaf's next round does not wait for the Prefect API.
Nothing is lost if the process dies first: the work dir's `published.json` names the last
round published, and the next publication of the leaf (any flow run of it) sends every
completed row after it. Event ids are derived from leaf, run and round, so a row sent twice
is one event to Prefect (its server drops an event id it already has).

The flow run that holds the leaf's work dir opens the publication; the rounds inside it
notify it; closing it waits until everything recorded is published.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prefect.exceptions import PrefectException

from bk_blocks.files import atomic_write

from .history import RoundRecord, history_rows
from .observability import emit_round_event, publish_artifacts

# Rounds shown in the history artifact: the latest ones (the Parquet history keeps them all).
ARTIFACT_ROWS = 50
MARKER = "published.json"
# How long closing a publication waits for the Prefect API before leaving the rest to the next run.
CLOSE_TIMEOUT_S = 60.0
EVENT_NAMESPACE = uuid.UUID("6f1c2b0e-5b1a-4c8e-9a57-2f0e8f4f1b7d")

logger = logging.getLogger(__name__)


def round_event_id(leaf_id: str, run_number: int, round_number: int) -> uuid.UUID:
    """The id of a round's completed event: the same for every publication of that round."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{leaf_id}/{run_number}/{round_number}/completed")


def published_through(work_dir: Path) -> tuple[int, int]:
    """The (run, round) of the last round published from this work dir; (0, 0) for none."""
    try:
        data = json.loads((Path(work_dir) / MARKER).read_text())
        return int(data["run_number"]), int(data["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def _mark_published(work_dir: Path, run_number: int, round_number: int) -> None:
    with atomic_write(Path(work_dir) / MARKER, "w") as handle:
        json.dump({"run_number": run_number, "round": round_number}, handle)


def publish_pending(leaf_name: str, work_dir: Path) -> int:
    """Publish each completed round not yet published, in order: a new version of the leaf's
    artifacts as of that round (one version per round, as the UI's history shows them) and its
    event; mark each published. Returns how many rounds were published."""
    rows = history_rows(work_dir, last=ARTIFACT_ROWS)
    done = published_through(work_dir)
    pending = [i for i, r in enumerate(rows) if r["status"] == "completed" and (r["run_number"], r["round"]) > done]
    for index in pending:
        row = rows[index]
        publish_artifacts(leaf_name, rows[:index + 1], flow_run_id=row["flow_run_id"])
        record = RoundRecord(**row)
        emit_round_event(record, event_id=round_event_id(record.leaf_id, record.run_number, record.round))
        _mark_published(work_dir, row["run_number"], row["round"])
    return len(pending)


class Publication:
    """A background thread publishing one leaf's new rounds whenever it is notified."""

    def __init__(self, leaf_name: str, work_dir: Path) -> None:
        self.leaf_name, self.work_dir = leaf_name, Path(work_dir)
        self._wanted = 0
        self._done = 0
        self._closing = False
        self._condition = threading.Condition()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name=f"publish-{leaf_name}")

    def start(self) -> "Publication":
        """Start the thread; it first publishes what an earlier run recorded and did not publish."""
        self.notify()
        self._thread.start()
        return self

    def notify(self) -> None:
        """A round was recorded: publish it (and whatever else is pending) soon."""
        with self._condition:
            self._wanted += 1
            self._condition.notify_all()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait until every notified round is published (or `timeout`), then stop the thread."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._done >= self._wanted, timeout=timeout)
        self._thread.join(timeout=1)
        if self._done < self._wanted:
            logger.warning("%s: some rounds are not published yet; the leaf's next run publishes them",
                           self.leaf_name)

    def _loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._wanted > self._done or self._closing)
                if self._wanted <= self._done:
                    return
                wanted = self._wanted
            try:
                publish_pending(self.leaf_name, self.work_dir)
            except (httpx.HTTPError, PrefectException, OSError) as exc:
                logger.warning("%s: could not publish its rounds to Prefect (the next round retries): %s",
                               self.leaf_name, exc)
                if self._closing:
                    wanted = self._wanted
            with self._condition:
                self._done = wanted
                self._condition.notify_all()


_open: dict[Path, Publication] = {}
_open_lock = threading.Lock()


@contextmanager
def publishing(leaf_name: str, work_dir: Path) -> Iterator[Publication]:
    """The leaf's publication for the duration: this process's open one for the work dir (a
    training run's, inside its rounds), else a new one, closed (everything published) at the end."""
    key = Path(work_dir).resolve()
    with _open_lock:
        existing = _open.get(key)
        if existing is None:
            existing = _open[key] = Publication(leaf_name, key)
            owner = True
        else:
            owner = False
    if not owner:
        yield existing
        return
    try:
        yield existing.start()
    finally:
        with _open_lock:
            _open.pop(key, None)
        existing.close()

