"""Publishing a leaf's recorded rounds to Prefect off the round's path: artifacts and round events.

A round is done once its history row is on disk. What Prefect shows of it (the leaf's history
and summary artifacts, the `branchkey.round.completed` event, `branchkey.metric.dropped` past
the leaf's alert, the global model's asset materialization) is derived from that row and
sent by a background thread, so the leaf's next round does not wait for the Prefect API.
Nothing is lost if the process dies first: the work dir's `published.json` names the last
round published, written only once the round's artifacts are stored and its event is sent,
and the next publication of the leaf (any flow run of it) sends every completed round after
it, in order. Event ids are derived from leaf, run and round, so a round sent twice is one
event to Prefect (its server keeps one event per id). Publications of one work dir take turns
(a lock file), so two processes never send the same round at once.

The flow run that holds the leaf's work dir opens the publication; its rounds notify it;
closing it waits until everything recorded is published. With an MLflow registry configured, the
same thread then registers the promoted rounds' global models (`prefect_branchkey.flows.publishing.registry`),
under its own marker: a registry that is down never holds back what Prefect shows, or the reverse.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.exceptions import PrefectHTTPStatusError

from prefect_branchkey.bk_blocks.files import atomic_write, exclusively
from prefect_branchkey.flows.leaf.history import RoundRecord, file_round, history_files, rows_by_file
from prefect_branchkey.flows.leaf.promotion import metric_dropped
from prefect_branchkey.flows.publishing.assets import model_asset_events
from prefect_branchkey.flows.publishing.observability import metric_dropped_event, publish_artifacts, round_event
from prefect_branchkey.flows.publishing.registry import Registrar, RegistrySettings

# Rounds shown in the history artifact: the latest ones (the Parquet history keeps them all).
ARTIFACT_ROWS = 50
MARKER = "published.json"
# History rows that become an artifact version and an event (every row the round flow records).
PUBLISHED_STATUSES = ("completed", "resynced", "evaluated")
# A marker's file name that sorts after every history file of its round.
_WHOLE_ROUND = "\uffff"
LOCK = ".published.lock"
# How long closing a publication waits for the Prefect API (when the flow run ends normally;
# a failing or interrupted run does not wait), before leaving the rest to the leaf's next run.
CLOSE_TIMEOUT_S = 60.0
# While publishing fails (the Prefect API is down), the thread tries again after these many
# seconds, the last one repeating, whether or not a new round arrives meanwhile.
RETRY_BACKOFF_S = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# How long the process's exit waits for a publication thread still attempting (one left
# retrying after its flow run): it must not be in pyarrow's native code when the interpreter
# finalises, which aborts the process ("terminate called without an active exception").
EXIT_JOIN_S = 15.0
EVENT_NAMESPACE = uuid.UUID("6f1c2b0e-5b1a-4c8e-9a57-2f0e8f4f1b7d")

logger = logging.getLogger(__name__)


def round_event_id(leaf_id: str, run_number: int, round_number: int, status: str = "completed") -> uuid.UUID:
    """The id of a round's event (`completed`, `resynced`, `metric-dropped`): the same for every
    publication of it."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{leaf_id}/{run_number}/{round_number}/{status}")


def published_through(work_dir: Path) -> tuple[int, int]:
    """The (run, round) of the last round published from this work dir; (0, 0) for none."""
    run_number, round_number, _ = _published_key(work_dir)
    return run_number, round_number


def _published_key(work_dir: Path) -> tuple[int, int, str]:
    """(run, round, history file name) of the last row published: a round can have two rows
    (`resynced` and `completed`), so the file name says which of them is done. A marker
    without one (an older version's) covers the whole round."""
    try:
        data = json.loads((Path(work_dir) / MARKER).read_text())
        return int(data["run_number"]), int(data["round"]), str(data.get("file", _WHOLE_ROUND))
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0, ""


def mark_published(work_dir: Path, run_number: int, round_number: int, file_name: str = _WHOLE_ROUND) -> None:
    """Record that every history row up to (run, round) and that row's file name is published."""
    with atomic_write(Path(work_dir) / MARKER, "w") as handle:
        json.dump({"run_number": run_number, "round": round_number, "file": file_name}, handle)


def send_events(events: list[Event]) -> None:
    """Send a round's events over a connection opened for them and closed once they are written.

    No connection stays open between rounds: an idle events websocket needs its event loop to
    answer keepalive pings, and a round may last hours. Opening one per round costs a handshake.
    Raises what the events client raises when the events cannot be written (the round stays
    pending); nothing of the connection outlives the call.
    """
    if events:
        asyncio.run(_emit_all(events))


async def _emit_all(events: list[Event]) -> None:
    async with get_events_client() as client:
        for event in events:
            await client.emit(event)


def _is_permanent(exc: Exception) -> bool:
    """A refusal that retrying will not change (the API answered 4xx)."""
    return isinstance(exc, PrefectHTTPStatusError) and 400 <= exc.response.status_code < 500


@contextmanager
def _turn(work_dir: Path) -> Iterator[None]:
    """Hold the work dir's publication lock (other threads and processes wait their turn)."""
    with exclusively(Path(work_dir) / LOCK):
        yield


def publish_pending(leaf_name: str, work_dir: Path) -> int:
    """Publish each completed round not yet published, in order: a new version of the leaf's
    artifacts as of that round (one version per round, as the UI's history shows them) and its
    event, then mark it published. A round the API refuses for good (4xx) is logged and passed
    over; any other failure raises and leaves the round pending. Returns the rounds published.

    Rows are walked by (run, round, file name) whether they are loose or compacted into a segment
    (a compacted row keeps its file name), so compaction neither skips nor repeats one."""
    with _turn(work_dir):
        files = history_files(work_dir)
        done = _published_key(work_dir)
        pending = [index for index, path in enumerate(files) if (*file_round(path), path.name) > done]
        if not pending:
            return 0
        rows = rows_by_file(files[max(0, pending[0] + 1 - ARTIFACT_ROWS):])
        published = 0
        for index in pending:
            path = files[index]
            row = rows[path.name]
            if row["status"] in PUBLISHED_STATUSES:
                window = {before.name for before in files[max(0, index + 1 - ARTIFACT_ROWS):index + 1]}
                try:
                    _publish_round(leaf_name, [r for name, r in rows.items() if name in window], row)
                except (PrefectHTTPStatusError, httpx.HTTPStatusError) as exc:
                    if not _is_permanent(exc):
                        raise
                    logger.error("%s: Prefect refused round %d of run %d, which is left unpublished: %s",
                                 leaf_name, row["round"], row["run_number"], exc)
                published += 1
            mark_published(work_dir, *file_round(path), path.name)
        return published


def _publish_round(leaf_name: str, rows: list[dict[str, object]], row: dict[str, object]) -> None:
    """`row`'s events, then the leaf's artifacts as of `rows` (the history up to `row`). Events
    first: a resend of an event is one event (its id is fixed), while a resend of the artifacts
    would be another version of them, so a failure between the two costs nothing."""
    record = RoundRecord(**row)  # type: ignore[arg-type]
    status = _event_status(record)
    events = [round_event(record, event_id=round_event_id(record.leaf_id, record.run_number, record.round, status))]
    if metric_dropped(row):
        events.append(metric_dropped_event(record, round_event_id(record.leaf_id, record.run_number, record.round,
                                                                  f"metric-dropped-{status}")))
    send_events([*events, *model_asset_events(record)])
    publish_artifacts(leaf_name, rows, flow_run_id=str(row["flow_run_id"]) if row["flow_run_id"] else None)


def _event_status(record: RoundRecord) -> str:
    """What tells a row's event apart from the round's others: its status, and for a drift check
    (several per round) also its time."""
    if record.status == "evaluated" and record.finished_at is not None:
        return f"evaluated-{int(record.finished_at.timestamp() * 1000)}"
    return record.status


class Publication:
    """A background thread publishing one leaf's new rounds whenever it is notified (and with a
    `registry`, registering the global models it promoted)."""

    def __init__(self, leaf_name: str, work_dir: Path, registry: RegistrySettings | None = None) -> None:
        self.leaf_name, self.work_dir, self.registry = leaf_name, Path(work_dir), registry
        self._registrar = Registrar(leaf_name, self.work_dir, registry) if registry else None
        self._wanted = 0
        self._done = 0
        self._failed = False
        self._closing = False
        self._retried = False
        self._stopping = False
        self._failures = 0
        self._registry_failures = 0
        self._condition = threading.Condition()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True,
                                        name=f"publish-{leaf_name}")

    def start(self) -> Publication:
        """Start the thread; it first publishes what an earlier run recorded and did not publish."""
        self.notify()
        self._thread.start()
        _RUNNING.add(self)
        return self

    def notify(self) -> None:
        """A round was recorded: publish it (and whatever else is pending) soon."""
        with self._condition:
            self._wanted += 1
            self._condition.notify_all()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait up to `timeout` s until every notified round is published, retrying once if the
        last attempt failed, and stop the thread. True when nothing is left pending."""
        with self._condition:
            self._closing = True
            self._retry_once_if_failed()
            self._condition.notify_all()
            done = self._condition.wait_for(lambda: self._done >= self._wanted, timeout=timeout)
            complete = done and not self._failed
        if not complete:
            what = "published to Prefect or registered in MLflow" if self._registrar else "published to Prefect"
            logger.warning("%s: rounds not yet %s; the leaf's next run publishes them", self.leaf_name, what)
        return complete

    def stop(self) -> None:
        """Tell the thread to end without another attempt (what it leaves pending, the leaf's
        next run publishes); `join` waits for the attempt under way."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` s for the thread to end."""
        if self._thread.is_alive():
            self._thread.join(max(timeout, 0.0))

    def _loop(self) -> None:
        """The thread: publish when notified, and while publishing fails, again after a back-off.
        Nothing escapes it: a failure is logged and the rounds stay pending."""
        while True:
            with self._condition:
                notified = self._condition.wait_for(
                    lambda: self._wanted > self._done or self._closing or self._stopping, timeout=self._retry_in())
                if self._stopping or (notified and self._wanted <= self._done):
                    return
                wanted = self._wanted
            failed = True
            try:
                failed = not self._attempt()
            finally:
                with self._condition:
                    self._done = wanted
                    self._failed = failed
                    if self._closing:
                        self._retry_once_if_failed()
                    self._condition.notify_all()

    def _retry_in(self) -> float | None:
        """How long the thread waits before trying again after a failure (None: until notified)."""
        streak = max(self._failures, self._registry_failures, 1)
        return RETRY_BACKOFF_S[min(streak, len(RETRY_BACKOFF_S)) - 1] if self._failed else None

    def _attempt(self) -> bool:
        """One publication of what is pending, then (with a registry) one registration of it."""
        published = self._publish()
        return self._register() and published

    def _register(self) -> bool:
        """Register the promoted rounds pending for MLflow (`Registrar` warns once per round)."""
        if self._registrar is None:
            return True
        try:
            registered = self._registrar.register_pending()
        except Exception as exc:
            logger.warning("%s: could not read the rounds to register in MLflow: %s: %s", self.leaf_name,
                           type(exc).__name__, exc)
            registered = False
        self._registry_failures = 0 if registered else self._registry_failures + 1
        return registered

    def _publish(self) -> bool:
        """Publish to Prefect: the first failure of a streak is a warning naming the cause, the ones
        after it are debug lines, and the catch-up after it is said once."""
        try:
            published = publish_pending(self.leaf_name, self.work_dir)
        except (Exception, asyncio.CancelledError) as exc:
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            logger.log(level, "%s: could not publish its rounds to Prefect (they stay pending, retried in the "
                       "background): %s: %s", self.leaf_name, type(exc).__name__, exc)
            return False
        if self._failures:
            logger.info("%s: Prefect reachable again: %d pending round(s) published after %d failed attempt(s)",
                        self.leaf_name, published, self._failures)
            self._failures = 0
        return True

    def _retry_once_if_failed(self) -> None:
        """While closing, one more attempt after a failed one (the caller holds the condition)."""
        if self._failed and not self._retried:
            self._retried = True
            self._wanted += 1


_RUNNING: weakref.WeakSet[Publication] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """Stop every publication thread still running before the interpreter finalises."""
    running = list(_RUNNING)
    for publication in running:
        publication.stop()
    deadline = time.monotonic() + EXIT_JOIN_S
    for publication in running:
        publication.join(deadline - time.monotonic())


@contextmanager
def publishing(leaf_name: str, work_dir: Path, registry: RegistrySettings | None = None) -> Iterator[Publication]:
    """A publication of the leaf's rounds for the duration (a training run's, or a lone round's),
    closed at the end: waiting for everything to be published when the block ends normally,
    not when it raises. With `registry`, promoted global models are registered in MLflow too."""
    publication = Publication(leaf_name, Path(work_dir).resolve(), registry)
    ended_normally = False
    try:
        yield publication.start()
        ended_normally = True
    finally:
        publication.close(timeout=CLOSE_TIMEOUT_S if ended_normally else 0)
