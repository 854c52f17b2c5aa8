"""A leaf's resumable state in its work directory: which round, which step, which model.

Written atomically after every step, so a flow run killed at any moment is rerun from
the step it stopped at: an accepted upload is never sent as a new update, a downloaded
aggregate is never lost. A schedule of one-round flow runs and one long run share it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.bk_blocks.files import atomic_write, remove_temporaries
from prefect_branchkey.tasks import run_logger

PHASES = ("idle", "trained", "uploaded", "aggregated", "downloaded")


class StateError(BranchKeyError, ValueError):
    """The work directory's state file is unreadable or belongs to another leaf."""


class WorkDirError(BranchKeyError, ValueError):
    """A work directory parameter that cannot be used on this machine."""


class LeafBusyError(BranchKeyError, RuntimeError):
    """Another process is running a round of this leaf in the same work directory."""


def cancelled_as_busy(exc: LeafBusyError) -> State:
    """End the run Cancelled, not Failed: another run of this leaf holds its work dir and does
    the leaf's next round, so this one has nothing to do (the CANCEL_NEW collision strategy)."""
    run_logger(__name__).warning("%s; cancelling this run", exc)
    return Cancelled(message=str(exc))


@dataclass
class LeafState:
    """Where a leaf is: the round in progress, its step, and what each step produced."""

    leaf_id: str
    run_number: int = 0
    round: int = 1
    phase: str = "idle"
    global_model: str | None = None
    consumed_aggregations: list[str] = field(default_factory=list)
    archive: str | None = None
    weighting: float | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    file_id: str | None = None
    idempotency_key: str | None = None
    bytes_up: int = 0
    aggregation_id: str | None = None
    bytes_down: int = 0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    evaluated: bool = False
    sent_metrics: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None
    counted_in: list[int] | None = None
    wait_expired: bool = False
    # What the round's update was made with, for its history row: update_norm, upload_precision,
    # and with DP dp_epsilon, dp_delta, clip_norm, noise_multiplier.
    update_facts: dict[str, Any] = field(default_factory=dict)
    model_dtypes: list[str] = field(default_factory=list)
    # The best global model so far by the primary metric, and the one the site serves
    # (`prefect_branchkey.flows.leaf.promotion`): run_number, round, aggregation_id, metric, value.
    best: dict[str, Any] | None = None
    serving: dict[str, Any] | None = None
    # What the round's global model was judged as, for its history row (`prefect_branchkey.flows.leaf.promotion`).
    model_facts: dict[str, Any] = field(default_factory=dict)
    # Payloads the round sent (its upload, its metrics), and the audit trail's head after the
    # leaf's latest entry (`prefect_branchkey.flows.leaf.audit`): both go into the history row.
    payloads_sent: int = 0
    audit_head: str | None = None
    # What the platform said of the round's aggregate (bk-server's notice: updates_aggregated).
    aggregate_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def last_aggregation(self) -> str | None:
        """The aggregation whose model the leaf holds (the last one it downloaded in this run)."""
        return self.consumed_aggregations[-1] if self.consumed_aggregations else None

    def start_round(self, run_number: int) -> None:
        """Begin the round's bookkeeping; a new run starts over from round 1 and no model."""
        if run_number != self.run_number:
            self.run_number, self.round, self.global_model = run_number, 1, None
            self.consumed_aggregations = []
        self.clear_round()

    def clear_round(self) -> None:
        self.phase, self.archive, self.weighting, self.train_metrics = "idle", None, None, {}
        self.file_id, self.idempotency_key, self.bytes_up = None, None, 0
        self.aggregation_id, self.bytes_down, self.durations, self.started_at = None, 0, {}, None
        self.eval_metrics, self.evaluated, self.sent_metrics = {}, False, []
        self.counted_in, self.wait_expired = None, False
        self.update_facts, self.model_facts, self.payloads_sent, self.aggregate_facts = {}, {}, 0, {}


def state_path(work_dir: Path) -> Path:
    return Path(work_dir) / "state.json"


def load_state(work_dir: Path, leaf_id: str) -> LeafState:
    """The leaf's state, or a fresh one; refuses a work dir that belongs to another leaf."""
    path = state_path(work_dir)
    if not path.exists():
        return LeafState(leaf_id=leaf_id)
    try:
        data: dict[str, Any] = _upgraded(json.loads(path.read_text()))
        state = LeafState(**data)
    except (ValueError, TypeError) as exc:
        raise StateError(f"{path} is not a valid leaf state: {exc}") from None
    if state.leaf_id != leaf_id:
        raise StateError(f"{path} belongs to leaf {state.leaf_id}, not {leaf_id}: use one work dir per leaf")
    if state.phase not in PHASES:
        raise StateError(f"{path} has unknown phase {state.phase!r}")
    return state


def _upgraded(data: Any) -> Any:
    """A state written by an earlier version in today's fields (`metrics_sent` became the
    evaluated flag and the list of metrics modes sent)."""
    if isinstance(data, dict) and "metrics_sent" in data:
        sent = bool(data.pop("metrics_sent"))
        data.setdefault("evaluated", sent)
        data.setdefault("sent_metrics", ["train", "test"] if sent else [])
    return data


def save_state(work_dir: Path, state: LeafState) -> None:
    """Write the state atomically (temporary file, fsync, rename)."""
    with atomic_write(state_path(work_dir), "w") as handle:
        json.dump(asdict(state), handle, indent=2)


def resolve_work_dir(work_dir: str | os.PathLike[str]) -> Path:
    """The work dir with `~` and `$VARIABLES` expanded on this machine (a deployment names
    `$BRANCHKEY_WORK_ROOT/leaf-a`, each worker sets where that is)."""
    expanded = os.path.expandvars(os.path.expanduser(os.fspath(work_dir)))
    if "$" in expanded:
        raise WorkDirError(f"work_dir {os.fspath(work_dir)!r} names an environment variable that is not set "
                           f"on this machine (expanded: {expanded!r})")
    if not expanded.strip():
        raise WorkDirError("work_dir is empty")
    return Path(expanded).absolute()


def _lock(fd: int, work_dir: Path) -> None:
    """Take the work dir's lock on `fd` and write who holds it, or LeafBusyError naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        raise LeafBusyError(f"work dir {work_dir} is in use by another run of this leaf ({holder}); "
                            "a leaf runs one round at a time") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, flow run {flow_run.get_id() or '-'}\n".encode(), 0)


def _remove_leftovers(work_dir: Path) -> None:
    """Remove temporary files a killed run left mid-write (state, updates, models, history): only
    the lock's holder writes them, so none of them is being written now."""
    remove_temporaries(work_dir, state_path(work_dir).name)
    for directory in ("updates", "models", "history"):
        if (work_dir / directory).is_dir():
            remove_temporaries(work_dir / directory)


@contextmanager
def hold_work_dir(work_dir: Path) -> Iterator[None]:
    """Hold the leaf's work dir, so two rounds of one leaf never overlap.

    An exclusive `flock` on `work_dir/.lock`, taken on a descriptor of this hold's own: any
    other hold (another worker's run, a manual run, another thread of this process) fails at
    once with LeafBusyError naming the holder. Leftover temporary files are removed first.
    """
    key = Path(work_dir).absolute()
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _lock(fd, key)
        _remove_leftovers(key)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
