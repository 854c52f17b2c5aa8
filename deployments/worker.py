"""`bk edge worker LEAF`: the leaf's process worker, which a stop never leaves half done.

`prefect worker start` answers SIGTERM by sending itself SIGINT and keeps running for minutes,
idle or busy; a second signal SIGKILLs it, orphaning a busy worker's flow-run process, whose
run then stays Running until that process dies. This worker runs Prefect's own `ProcessWorker`
in this process, under its own signal handling, and keeps these promises:

- On SIGTERM or SIGINT (`systemctl stop`, Ctrl-C) it polls no more, at once: no run is picked
  up after the signal.
- A run in progress gets `grace_s` seconds to finish. Then it is cancelled through Prefect:
  its state is set to Cancelling, and the run's own executor in this worker signals the run's
  process group (SIGTERM, SIGKILL 30 s later) and records it Cancelled, as a cancellation from
  the UI does. A second signal skips what is left of the grace.
- Whatever of a cancelled run's process group is alive `CANCEL_BOUND_S` after the request is
  SIGKILLed by this worker, and a run that is not then Completed, Failed or Cancelled is forced
  Cancelled. The worker itself has a deadline from the signal on (the grace, `CANCEL_BOUND_S`,
  its teardown `TEARDOWN_S`): past it, its teardown is cut short and what is left of its runs
  killed and marked. So it exits within `stop_bound_s(grace_s)` = `grace_s` + 60 s, and no
  process of a run it cancelled outlives it.
- The leaf's state is crash-safe (`flows/leaf/state.py`): a cancelled round resumes at the step
  that did not finish on the leaf's next run.

A run in progress is a child process of this one whose environment names its flow run
(`PREFECT__FLOW_RUN_ID`, set by Prefect's engine command), each the leader of its own process
group; they are found in /proc, so this worker runs on Linux, as the systemd unit of
docs/edge-workers.md does. Before it starts, the leaf is checked on the server: the work pool,
the leaf's queue (and any extra queue) and its credentials Block must exist, else one line names
the missing one and the command that creates it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import anyio
import httpx
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_WORKER_QUERY_SECONDS
from prefect.states import Cancelled, Cancelling
from prefect.utilities.services import critical_service_loop
from prefect.workers.process import ProcessWorker

from prefect_branchkey.deployments.automations import LOST_RUN_AUTOMATION
from prefect_branchkey.deployments.edge import DEFAULT_POOL, EdgeSetupError, require_api_url

CREDENTIALS_BLOCK_TYPE = "branchkey-credentials"
# A run in progress has this long to finish after a stop before it is cancelled (`--grace-s`):
# enough for an upload or a download under way to end; a round cut later resumes where it was.
DEFAULT_GRACE_S = 120.0
# Prefect's cancellation SIGTERMs the run's process group and SIGKILLs it 30 s later; past this,
# the worker SIGKILLs what is left itself.
CANCEL_BOUND_S = 45.0
# The worker's own teardown after its last run ended: Prefect's side of the cancellation (the run's
# cancellation hooks, its Cancelled state: 10-20 s measured), closing the API client, and FINISH_S
# for the runs' final check (`Reaper.finish`).
TEARDOWN_S = 15.0
FINISH_S = 5.0
# Prefect's shortest flow-run heartbeat, and the one the runs of this worker send by default: the
# lost-run automation (`bk edge setup --lost-run-after`) marks a run Crashed when they stop.
HEARTBEAT_S = 30
SWEEP_S = 0.2
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}


@dataclass(frozen=True)
class WorkerOptions:
    """What `bk edge worker` serves and how it stops."""

    leaf: str
    pool: str = DEFAULT_POOL
    extra_queues: tuple[str, ...] = ()
    grace_s: float = DEFAULT_GRACE_S
    name: str | None = None
    heartbeat_s: int = HEARTBEAT_S
    credentials_block: bool = True

    @property
    def queues(self) -> list[str]:
        return list(dict.fromkeys((self.leaf, *self.extra_queues)))

    @property
    def worker_name(self) -> str:
        """The worker's name in the UI: the leaf and this machine, the same across restarts."""
        return self.name or f"{self.leaf}@{socket.gethostname()}"


def stop_bound_s(grace_s: float) -> float:
    """The longest a stop takes: the grace, the cancellation, the teardown (the docs' TimeoutStopSec
    must exceed it)."""
    return grace_s + CANCEL_BOUND_S + TEARDOWN_S


def check_leaf(options: WorkerOptions) -> None:
    """EdgeSetupError naming what the leaf lacks on the server (pool, queue, Block) and the command
    that creates it; nothing is changed."""
    require_api_url()
    if not options.grace_s >= 0:
        raise EdgeSetupError(f"--grace-s must be 0 or more seconds, got {options.grace_s:g}")
    if options.heartbeat_s < HEARTBEAT_S:
        raise EdgeSetupError(f"--heartbeat-s must be at least {HEARTBEAT_S} (Prefect's shortest), "
                             f"got {options.heartbeat_s}")
    try:
        _check_server_side(options)
    except httpx.HTTPError as exc:
        raise EdgeSetupError(f"cannot reach the Prefect server at {PREFECT_API_URL.value()}: "
                             f"{type(exc).__name__}: {exc}") from None


def _check_server_side(options: WorkerOptions) -> None:
    """The pool, the queues and the Block, read from the server (httpx errors are the caller's)."""
    setup = f"bk edge setup {options.leaf}=<its credentials JSON> --host <the platform's API>"
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(options.pool)
        except ObjectNotFound:
            raise EdgeSetupError(f"work pool {options.pool} does not exist: create it with `{setup}`") from None
        for queue in options.queues:
            try:
                client.read_work_queue_by_name(queue, work_pool_name=options.pool)
            except ObjectNotFound:
                command = setup if queue == options.leaf else f"prefect work-queue create {queue} --pool {options.pool}"
                raise EdgeSetupError(f"work queue {queue} of pool {options.pool} does not exist: "
                                     f"create it with `{command}`") from None
        if options.credentials_block:
            try:
                client.read_block_document_by_name(options.leaf, block_type_slug=CREDENTIALS_BLOCK_TYPE)
            except ObjectNotFound:
                raise EdgeSetupError(f"credentials Block {CREDENTIALS_BLOCK_TYPE}/{options.leaf} does not exist: "
                                     f"create it with `{setup}`") from None


def lost_runs_watched() -> bool:
    """Whether the server has the automation that marks runs without heartbeats Crashed."""
    with get_client(sync_client=True) as client:
        return bool(client.read_automations_by_name(LOST_RUN_AUTOMATION))


def say(message: str) -> None:
    """One status line on stdout (journald timestamps it)."""
    print(f"bk edge worker: {message}", flush=True)


def flow_run_processes(parent: int | None = None) -> dict[UUID, int]:
    """The flow runs executing as child processes of `parent` (this process): run id -> pid, which
    is also the run's process group (Prefect starts each run in a session of its own)."""
    parent = os.getpid() if parent is None else parent
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent or fields[0] == "Z":
                continue
            for variable in (entry / "environ").read_bytes().split(b"\0"):
                name, _, value = variable.partition(b"=")
                if name == b"PREFECT__FLOW_RUN_ID":
                    found[UUID(value.decode())] = int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    return found


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class Shutdown:
    """The stop requests: the first signal stops polling and starts the grace, the second skips
    what is left of it; a failure of the worker's own loops stops it too, with exit status 1."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    hurry: anyio.Event = field(default_factory=anyio.Event)
    signals: int = 0
    failure: str | None = None

    def on_signal(self, signum: int, grace_s: float) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            say(f"{name}: taking no new runs; a run in progress has {grace_s:g} s to finish, then it is cancelled "
                f"(a second signal cancels it now)")
            self.requested.set()
        else:
            say(f"{name} again: cancelling the runs in progress now")
            self.hurry.set()

    def fail(self, reason: str) -> None:
        self.failure = self.failure or reason
        say(f"stopping: {reason}")
        self.requested.set()


@dataclass
class Cancellation:
    """A run this worker cancelled: its process group, and when it asked."""

    pgid: int
    asked_at: float
    killed: bool = False


@dataclass
class Reaper:
    """Cancels every run still executing here, through Prefect, and makes sure each ends: its
    process group gone and its state final."""

    client: PrefectClient
    cancelled: dict[UUID, Cancellation] = field(default_factory=dict)

    async def run(self) -> None:
        """Sweep until cancelled (once the worker has torn down)."""
        while True:
            await self.sweep()
            await anyio.sleep(SWEEP_S)

    async def sweep(self) -> None:
        """Ask Prefect to cancel each run not asked yet; SIGKILL a group past CANCEL_BOUND_S."""
        for run_id, pid in flow_run_processes().items():
            if run_id not in self.cancelled:
                self.cancelled[run_id] = Cancellation(pid, time.monotonic())
                await self._ask(run_id, pid)
        for run_id, cancellation in self.cancelled.items():
            overdue = time.monotonic() - cancellation.asked_at > CANCEL_BOUND_S
            if not cancellation.killed and overdue and group_alive(cancellation.pgid):
                say(f"flow run {run_id}: still running {CANCEL_BOUND_S:g} s after its cancellation: SIGKILL")
                kill_group(cancellation.pgid)
                cancellation.killed = True

    async def _ask(self, run_id: UUID, pgid: int) -> None:
        """Cancelling, as the UI and `prefect flow-run cancel` set it: the run's executor here then
        stops it. Not forced, so a run that ended meanwhile keeps its final state. If the server
        cannot be reached or does not accept it, SIGTERM the group directly (what ends the run's
        state is then `finish`, or the lost-run automation)."""
        say(f"flow run {run_id}: cancelling (the worker is stopping)")
        try:
            result: OrchestrationResult[object] = await self.client.set_flow_run_state(
                run_id, Cancelling(message=STOP_MESSAGE))
            if result.status == SetStateStatus.ACCEPT:
                return
            reason = f"the server answered {result.status.value}"
        except Exception as exc:  # any failure to reach the API: the signal is left as the way
            reason = f"{type(exc).__name__}: {exc}"
        say(f"flow run {run_id}: not set Cancelling ({reason}); sending SIGTERM to its processes")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)

    async def finish(self) -> None:
        """After the worker's teardown: no group of a cancelled run left, and each run final, within
        FINISH_S."""
        for run_id, pid in flow_run_processes().items():  # started after the last sweep, if teardown was cut short
            self.cancelled.setdefault(run_id, Cancellation(pid, time.monotonic()))
        with anyio.move_on_after(FINISH_S):
            for cancellation in list(self.cancelled.values()):  # copies: the sweep may still add runs
                kill_group(cancellation.pgid)
            while any(group_alive(c.pgid) for c in list(self.cancelled.values())):
                await anyio.sleep(0.05)
            for run_id in list(self.cancelled):
                await self._ensure_final(run_id)

    async def _ensure_final(self, run_id: UUID) -> None:
        """Force Cancelled unless the run ended Completed, Failed or Cancelled (a run SIGKILLed here
        was reported Crashed by its executor: it was cancelled, and says so)."""
        try:
            state = (await self.client.read_flow_run(run_id)).state
            if state is None or state.type not in FINAL:
                await self.client.set_flow_run_state(run_id, Cancelled(message=STOP_MESSAGE), force=True)
                say(f"flow run {run_id}: Cancelled (was {state.name if state else 'without a state'})")
        except Exception as exc:  # the API may be down at the stop: the automation covers it
            say(f"flow run {run_id}: cannot read or set its state ({type(exc).__name__}: {exc}); the lost-run "
                "automation marks it Crashed when its heartbeats stop")


STOP_MESSAGE = ("The leaf's worker stopped (bk edge worker): the run was cancelled; the round resumes at the "
                "step that did not finish on the leaf's next run.")


async def _keep(workload: Callable[[], Coroutine[object, object, object]], interval: float, what: str,
                shutdown: Shutdown) -> None:
    """Prefect's forgiving service loop (transient API errors back off); past its error threshold the
    worker stops, as `prefect worker start` does, so a supervisor restarts it."""
    try:
        await critical_service_loop(workload=workload, interval=interval, jitter_range=0.3, backoff=4,
                                    printer=lambda *parts: say(" ".join(str(p) for p in parts)))
    except Exception as exc:  # past the threshold, or a 4xx Prefect's loop re-raises at once (a revoked key)
        shutdown.fail(f"{what} failed ({type(exc).__name__}: {exc})")


async def _watch_signals(shutdown: Shutdown, grace_s: float) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            shutdown.on_signal(signum, grace_s)


async def _poll_until_stopped(worker: ProcessWorker, shutdown: Shutdown) -> None:
    """Poll for runs and heartbeat until a stop is requested; then neither, at once. One heartbeat
    first, which the first poll needs (the work pool's template; Prefect 3.9 sends it on entering
    the worker, earlier 3.x in `start()`); a failed one is left to the heartbeat loop."""
    with contextlib.suppress(httpx.HTTPError):
        await worker.sync_with_backend()
    async with anyio.create_task_group() as services:
        services.start_soon(_keep, worker.get_and_submit_flow_runs, PREFECT_WORKER_QUERY_SECONDS.value(), "polling",
                            shutdown)
        services.start_soon(_keep, worker.sync_with_backend, worker.heartbeat_interval_seconds, "the heartbeat",
                            shutdown)
        await shutdown.requested.wait()
        services.cancel_scope.cancel()


async def _grace(shutdown: Shutdown, grace_s: float) -> None:
    """Let the runs in progress finish, for up to `grace_s` (or until a second signal)."""
    running = flow_run_processes()
    if not running:
        return
    say(f"waiting up to {grace_s:g} s for {len(running)} run(s) in progress: {', '.join(map(str, running))}")
    with anyio.move_on_after(grace_s):
        while flow_run_processes() and not shutdown.hurry.is_set():
            await anyio.sleep(SWEEP_S)


async def _bound(scope: anyio.CancelScope, shutdown: Shutdown, grace_s: float) -> None:
    """Give the worker (its grace, its runs' cancellation and its own teardown) a deadline from the
    stop on, brought forward by a second signal: Prefect's side of a cancellation (the run's
    cancellation hooks, its final state) has no bound of its own."""
    await shutdown.requested.wait()
    scope.deadline = anyio.current_time() + grace_s + CANCEL_BOUND_S + TEARDOWN_S - FINISH_S
    await shutdown.hurry.wait()
    scope.deadline = min(scope.deadline, anyio.current_time() + CANCEL_BOUND_S + TEARDOWN_S - FINISH_S)


async def serve(options: WorkerOptions) -> int:
    """Run the leaf's worker until a stop; 0 after a requested stop, 1 if its loops failed."""
    shutdown = Shutdown()
    async with get_client() as client, anyio.create_task_group() as background:
        background.start_soon(_watch_signals, shutdown, options.grace_s)
        reaper = Reaper(client)
        with anyio.CancelScope() as bounded:
            background.start_soon(_bound, bounded, shutdown, options.grace_s)
            async with ProcessWorker(work_pool_name=options.pool, work_queues=options.queues,
                                     name=options.worker_name, create_pool_if_not_found=False) as worker:
                say(f"worker {worker.name!r} started on {options.pool}/{', '.join(options.queues)}; a stop takes at "
                    f"most {stop_bound_s(options.grace_s):g} s (grace {options.grace_s:g} s)")
                await _poll_until_stopped(worker, shutdown)
                await _grace(shutdown, options.grace_s)
                background.start_soon(reaper.run)
        if bounded.cancelled_caught:
            say("the worker's teardown reached the stop's bound: cut short")
        await reaper.finish()
        background.cancel_scope.cancel()
    say(f"worker {options.worker_name!r} stopped")
    return 1 if shutdown.failure else 0


def run_worker(options: WorkerOptions) -> int:
    """Check the leaf, then serve its queue until stopped; the exit status."""
    if sys.platform != "linux":
        raise EdgeSetupError("bk edge worker finds its runs' processes in /proc: it runs on Linux")
    check_leaf(options)
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(options.heartbeat_s)
    if not lost_runs_watched():
        say(f"no {LOST_RUN_AUTOMATION} automation on the server: a run whose machine dies stays Running; "
            "create it with `bk edge setup ... --lost-run-after 300`")
    return anyio.run(serve, options)
