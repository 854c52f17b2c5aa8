"""Simulate a federation on a Dask cluster (Prefect's `DaskTaskRunner`): every leaf's round is a
task run on a Dask worker process, tagged by leaf, and the federation's side-by-side history is
published as artifacts round by round.

Each round draws its leaves (`prefect_branchkey.flows.federation.sampling`); every drawn leaf runs its round as a task
(`<leaf>-round-<n>`), the undrawn ones sit it out, and the next round starts once every drawn
leaf's task has ended. A leaf that fails does not stop the federation: the platform closes the
round at its deadline with the others' updates, and the leaf resumes from its work dir when next
drawn. A local cluster (one worker process per core by default) and a cluster reached by address
run the same code; leaves keep their state in `work_root/<leaf>`, which every worker must reach
(a shared filesystem on a real cluster). A drawn round's leaves wait for each other's uploads, so
the cluster must run that many tasks at once: each worker of a local cluster can run the whole
draw (the leaves of a lost worker start at once on another), a cluster by address is refused when
it has fewer threads.

A round gets every drawn leaf's update or fails loudly. Each leaf is drawn for the platform's open
round and uploads into no other: one that finds the round closed without it fails its task instead
of joining a later round (another draw's). A Dask worker lost mid-round is said in the log with the
scheduler's reason, a local cluster gets a new worker in its place (`cluster.ClusterWatch`), and
its leaves run again within the round (Dask reschedules them; a leaf whose task ended with its
worker lost is submitted again while its round is open), resuming from their work dirs. A round
that went on without part of its draw fails the simulation at its end, naming the rounds and
leaves; a cluster that cannot run a round's draw at once stops it before that round.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import PrefectException
from prefect.futures import PrefectFuture
from prefect.states import State

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.errors import BranchKeyError, MissingExtraError, UsageError
from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.flows.federation.leaves import leaf_block, leaf_credentials, leaf_files
from prefect_branchkey.flows.federation.sampling import SamplingPlan, sampling_plan
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.promotion import promotion_policy
from prefect_branchkey.flows.leaf.state import LeafBusyError, hold_work_dir, load_state
from prefect_branchkey.flows.participant import Participant, ParticipantError, load_participant, participant_class
from prefect_branchkey.flows.publishing.observability import (
    artifact_key,
    label_flow_run,
    publish_federation_artifacts,
    run_tags,
)
from prefect_branchkey.flows.round import MAX_RESYNCS, RoundResult, Timeouts, run_round
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdatePolicy, UpdateSettings, update_policy

try:
    import distributed
    from distributed.comm import CommClosedError
    from prefect_dask import DaskTaskRunner
except ImportError as exc:
    raise MissingExtraError("A simulated federation", "simulation", exc) from None
from prefect_branchkey.flows.federation.cluster import ClusterWatch, dask_client_of
from prefect_branchkey.tasks import LeafSession, run_logger

# How often the federation artifacts are brought up to date while a round runs, in seconds.
FEDERATION_REFRESH_S = 1.0
# How long the simulation waits for a Dask scheduler given by address to answer, in seconds.
CONNECT_TIMEOUT_S = 10
SAMPLING_FILE = "sampling.json"
DEFAULT_PARTICIPANT = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
# The participants a Dask worker keeps between rounds (one per leaf it ran; the oldest go first).
PARTICIPANTS_PER_WORKER = 256
# How often the simulation looks whether a leaf's task has ended, in seconds.
POLL_S = 0.05
# How long a leaf's task waits for its work dir while another hold of it ends, in seconds: a worker
# that lost the scheduler runs on until its nanny ends it, holding the rounds it was running.
WORK_DIR_WAIT_S = 60.0
WORK_DIR_POLL_S = 0.5
# How many times one leaf's round is submitted again in one round after its worker was lost.
RESUBMISSIONS = 2
# Where a local cluster's scheduler serves its HTTP routes (metrics, health; no dashboard): a free
# loopback port, so simulations side by side do not contend for Dask's default 8787.
SCHEDULER_HTTP_ADDRESS = "127.0.0.1:0"


class SimulationError(BranchKeyError, ValueError):
    """A simulation that cannot start or go on as asked (no leaves, no cluster at the address, too
    few threads; a round without part of its draw)."""


def dask_runner(address: str | None, workers: int | None, tasks_at_once: int) -> DaskTaskRunner:
    """The task runner: the cluster at `address` (refused, naming it, when it does not answer or has
    fewer than `tasks_at_once` threads), else a local cluster of `workers` processes (default: one
    per core), each with threads for all `tasks_at_once` leaves: were a worker lost, the workers
    left start its leaves at once instead of queueing them behind leaves waiting for their uploads
    (a round's tasks mostly wait on the platform: idle threads cost little)."""
    if address:
        threads = cluster_threads(address)
        if threads < tasks_at_once:
            raise SimulationError(f"the Dask cluster at {address} runs {threads} tasks at once; a round needs "
                                  f"{tasks_at_once} (its leaves wait for each other's uploads)")
        return DaskTaskRunner(address=address)
    if workers is not None and workers < 1:
        raise SimulationError(f"workers must be at least 1, got {workers}")
    processes = workers or os.cpu_count() or 1
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": processes, "threads_per_worker": tasks_at_once, "processes": True, "dashboard_address": None,
        "scheduler_kwargs": {"dashboard": False, "dashboard_address": SCHEDULER_HTTP_ADDRESS}})


def cluster_threads(address: str) -> int:
    """How many tasks the Dask cluster at `address` runs at once; SimulationError naming the
    address when no scheduler answers there."""
    try:
        with distributed.Client(address, timeout=CONNECT_TIMEOUT_S) as client:
            return sum(client.nthreads().values())
    except (OSError, TimeoutError, ValueError) as exc:
        raise SimulationError(f"no Dask scheduler answers at {address}: {exc}") from None


@task(name="leaf-round", cache_policy=NO_CACHE)
def leaf_round(credentials_file: Path, connection: tuple[str, str, str | None], participant: str,
               options: dict[str, Any], work_dir: Path, timeouts: Timeouts, policy: UpdatePolicy,
               drawn_for: tuple[int, int] | None = None) -> RoundResult:
    """One leaf's round on a Dask worker: its credentials read there from their file (no token
    travels with the task), its participant kept by the worker between rounds, the round resumed
    from the leaf's work dir if an earlier attempt (on any worker) stopped mid-way. `drawn_for` is
    the platform's (run, round) the leaf was drawn for: it does that round and uploads into no
    other (`drawn_round`)."""
    block = leaf_block(credentials_file, *connection)
    model = worker_participant(block.leaf_name, participant, json.dumps(options, sort_keys=True))
    with (_work_dir_held(work_dir, WORK_DIR_WAIT_S), LeafSession(block) as session,
          tags(*run_tags(block, session.branch_name))):
        promotion = promotion_policy(model)
        return drawn_round(lambda: run_round(session, model, work_dir, timeouts, policy=policy, promotion=promotion),
                           work_dir, block.leaf_id, drawn_for)


@contextmanager
def _work_dir_held(work_dir: Path, wait_s: float) -> Iterator[None]:
    """Hold the leaf's work dir, waiting up to `wait_s` while another hold ends (said once): the
    leaf's round that Dask moved off a lost worker may start while that worker's process, its
    connection to the scheduler gone, still runs the round until its nanny ends it."""
    deadline = time.monotonic() + wait_s
    said = False
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(hold_work_dir(work_dir))
                break
            except LeafBusyError as exc:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    run_logger(__name__).warning("%s; waiting up to %.0f s for that hold to end", exc, wait_s)
                    said = True
                time.sleep(WORK_DIR_POLL_S)
        yield


def drawn_round(run: Callable[[], RoundResult], work_dir: Path, leaf_id: str,
                drawn_for: tuple[int, int] | None) -> RoundResult:
    """The leaf's round `drawn_for` (run, round) by `run` (one `run_round`): an unfinished earlier
    round is finished first and a resync moves the leaf up to it, as `round_in_step` does; a round
    the leaf already completed (an earlier attempt of this task on a lost worker) is returned as
    recorded. SimulationError when the round closed without the leaf's update: it does not go on
    into a later round, which holds another draw. Without `drawn_for` (a platform that does not
    say its open round), the leaf follows the platform as `round_in_step` does."""
    if drawn_for is not None and (recorded := _recorded_round(work_dir, leaf_id, drawn_for)) is not None:
        return recorded
    result = run()
    for _ in range(MAX_RESYNCS):
        if not _short_of(result, drawn_for):
            break
        result = run()
    at = (result.run_number, result.round)
    if drawn_for is not None and (result.status == "resynced" or (result.status == "completed" and at != drawn_for)):
        raise SimulationError(f"round {drawn_for[1]} (run {drawn_for[0]}) closed without this leaf's update: the leaf "
                              f"is at round {at[1]} (run {at[0]}) now and uploads into no round it was not drawn for")
    return result


def _short_of(result: RoundResult, drawn_for: tuple[int, int] | None) -> bool:
    """Whether the leaf has yet to do its drawn round after `result`: it resynced up to it (or, not
    knowing it, resynced at all), or it finished an earlier round left unfinished."""
    at = (result.run_number, result.round)
    if result.status == "resynced":
        return drawn_for is None or at <= drawn_for
    return result.status == "completed" and drawn_for is not None and at < drawn_for


def _recorded_round(work_dir: Path, leaf_id: str, drawn_for: tuple[int, int]) -> RoundResult | None:
    """The drawn round as the leaf's history recorded it when the leaf is already past it (an
    attempt on a worker since lost finished it); None while the leaf has not reached past it.
    SimulationError when the leaf is past it without having completed it."""
    state = load_state(work_dir, leaf_id)
    if state.phase != "idle" or (state.run_number, state.round) <= drawn_for:
        return None
    rows = [row for row in history_rows(work_dir)
            if (row["run_number"], row["round"]) == drawn_for and row["status"] == "completed"]
    if not rows:
        raise SimulationError(f"the leaf is at round {state.round} (run {state.run_number}), past round {drawn_for[1]} "
                              f"(run {drawn_for[0]}) it was drawn for, which it did not complete")
    return RoundResult("completed", drawn_for[0], drawn_for[1], eval_metrics=dict(rows[-1]["eval_metrics"] or {}))


@functools.lru_cache(maxsize=PARTICIPANTS_PER_WORKER)
def worker_participant(leaf: str, participant: str, options_json: str) -> Participant:
    """The leaf's participant, built once per worker process and kept for its later rounds there
    (as a flow run keeps its participant: its data loaded once, its random state going on)."""
    return load_participant(participant, json.loads(options_json))


def simulate(host: str, credentials_dir: str, work_root: str, *, dask_address: str | None = None,
             workers: int | None = None, **options: Any) -> dict[str, list[RoundResult]]:
    """Check the leaves, the participant, the update settings, the sampling and the platform's
    round rules, set up the Dask task runner (nothing starts when the cluster at `dask_address`
    does not answer), then run `federated_simulation` on it with `options` (its parameters)."""
    blocks = leaf_credentials(Path(credentials_dir), host, options.get("transport", "websocket"))
    promotion_policy(participant_class(options.get("participant", DEFAULT_PARTICIPANT)))
    update_policy(UpdateSettings.model_validate(options.get("update") or {}),
                  PrivacySettings.model_validate(options.get("privacy") or {}))
    plan = sampling_plan([b.leaf_name for b in blocks], options.get("fraction", 1.0),
                         options.get("leaves_per_round"), options.get("seed", 0))
    _check_round_rules(blocks[0], plan)
    runner = dask_runner(dask_address, workers, plan.per_round)
    # DaskTaskRunner is a TaskRunner[PrefectDaskFuture]; with_options' annotation wants TaskRunner[PrefectFuture].
    return federated_simulation.with_options(task_runner=runner)(  # type: ignore[arg-type]
        host, credentials_dir, work_root, **options)


def _check_round_rules(block: BranchKeyCredentials, plan: SamplingPlan) -> None:
    """Refuse a branch that closes a round at another number of updates than the leaves drawn per
    round, or that, with sampling, has no deadline (a drawn leaf that fails or declines would hold
    every round open): checked when the branch config says (the official platform's may not)."""
    try:
        with LeafSession(block) as session:
            branch = session.client.branch_config().get("branch", {})
    except BranchKeyError as exc:
        run_logger(__name__).warning("the branch's round rules could not be read (%s); not checked", exc)
        return
    if not isinstance(branch, dict):
        return
    needed = branch.get("min_updates")
    if isinstance(needed, int) and needed != plan.per_round:
        raise SimulationError(f"the branch closes a round at {needed} updates but each round draws {plan.per_round} "
                              f"of the {len(plan.leaves)} leaves: set the branch's min_updates to {plan.per_round} "
                              "or draw that many")
    if "round_deadline_s" in branch and branch["round_deadline_s"] is None and plan.per_round < len(plan.leaves):
        raise SimulationError("the branch has no round deadline: with sampling, a drawn leaf that fails or sits the "
                              "round out would hold every round open; give the branch a round_deadline_s and a quorum")


@flow(name="federated-simulation")
def federated_simulation(
    host: str,
    credentials_dir: str,
    work_root: str,
    participant: str = DEFAULT_PARTICIPANT,
    participant_options: dict[str, Any] | None = None,
    rounds: int = 5,
    transport: Literal["websocket", "amqp"] = "websocket",
    amqp_host: str | None = None,
    aggregation_timeout_s: float = 600,
    update: UpdateSettings = UpdateSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    privacy: PrivacySettings = PrivacySettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    fraction: float = 1.0,
    leaves_per_round: int | None = None,
    seed: int = 0,
) -> dict[str, list[RoundResult]]:
    """Run `rounds` rounds of the leaves in `credentials_dir`, each round drawing `fraction` of them
    (or `leaves_per_round`) from `seed`; leaf i gets `leaf_index=i, leaves=N` added to the
    participant options (for splitting a data set across leaves). `update` and `privacy` are the
    rounds' typed settings, as `federated_round` takes them. Run it with a Dask task runner
    (`simulate` sets one up); returns each leaf's round results. A leaf whose Dask worker was lost
    runs its round again within the round (`_await_round`). Fails when every drawn leaf of a round
    failed (nothing trains), a leaf's participant or settings were refused, or the cluster cannot
    run a round's draw at once (it lost workers that were not replaced); and at the end, when any
    round went on without some of its drawn leaves (they failed it, or it closed without them),
    naming them."""
    logger = get_run_logger()
    files = leaf_files(Path(credentials_dir))
    blocks = [leaf_block(path, host, transport, amqp_host) for path in files]
    plan = sampling_plan([b.leaf_name for b in blocks], fraction, leaves_per_round, seed)
    with LeafSession(blocks[0]) as session:
        branch = session.branch_name
    label_flow_run(f"{branch}-{len(blocks)}-leaves-{rounds}-rounds",
                   ["branchkey", f"branch:{branch}", f"branch-id:{blocks[0].branch_id}"])
    logger.info("simulating %d leaves, %d per round, for %d rounds over %s", len(blocks), plan.per_round, rounds,
                transport)
    root = Path(work_root)
    root.mkdir(parents=True, exist_ok=True)
    _record_plan(root, plan, rounds)
    leaves = {b.leaf_name: (i, b, path) for i, (b, path) in enumerate(zip(blocks, files, strict=True))}
    submission = _Submission((host, transport, amqp_host), participant, participant_options or {}, leaves, root,
                             Timeouts(aggregation_s=aggregation_timeout_s), update_policy(update, privacy), branch)
    results: dict[str, list[RoundResult]] = {b.leaf_name: [] for b in blocks}
    incomplete: dict[int, list[str]] = {}
    work_dirs = {b.leaf_name: root / b.leaf_name for b in blocks}
    histories = {name: history_rows(path) for name, path in work_dirs.items()}
    published = functools.partial(_publish_ended, branch, work_dirs, histories)
    watch = _cluster_watch(plan.per_round)
    for round_number in range(1, rounds + 1):
        _check_capacity(watch, round_number)
        drawn = _DrawnRound(submission, round_number, _open_round(blocks[0]), blocks[0])
        for name in plan.chosen(round_number):
            drawn.futures[name] = submission.submit(name, round_number, drawn.drawn_for)
        _await_round(drawn, watch, published)
        failed = [name for name, future in drawn.futures.items()
                  if not _collect(name, future, results[name], round_number)]
        drawn.release()
        if len(failed) == len(drawn.futures):
            raise SimulationError(f"every leaf drawn for round {round_number} failed ({', '.join(failed)}): see their "
                                  "task runs; the simulation stops")
        if failed:
            incomplete[round_number] = failed
    for name, done in results.items():
        logger.info("%s: %s", name, json.dumps([(r.round, r.status, r.eval_metrics) for r in done]))
    if incomplete:
        raise SimulationError(f"{len(incomplete)} of {rounds} rounds went on without part of their draw, so their "
                              "aggregates miss those leaves' updates: " + "; ".join(
                                  f"round {n}: {', '.join(names)} failed" for n, names in incomplete.items())
                              + " (see their task runs)")
    return results


def _record_plan(root: Path, plan: SamplingPlan, rounds: int) -> None:
    """Keep the drawn leaves per round in the work root and as a table artifact."""
    table = plan.table(rounds)
    with atomic_write(root / SAMPLING_FILE, "w") as handle:
        json.dump({"seed": plan.seed, "per_round": plan.per_round, "rounds": table}, handle, indent=1)
    create_table_artifact(table=table, key=artifact_key("sampling", f"{len(plan.leaves)}-leaves-seed-{plan.seed}"),
                          description=f"Leaves drawn per round ({plan.per_round} of {len(plan.leaves)}, "
                                      f"seed {plan.seed})")


def _collect(name: str, future: PrefectFuture[RoundResult], into: list[RoundResult], round_number: int) -> bool:
    """Keep a leaf's round result (True); a leaf that failed is logged and left to resume when next
    drawn (False), unless its participant or settings were refused: that fails the simulation."""
    try:
        into.append(future.result())
        return True
    except (ParticipantError, UsageError):
        raise
    except Exception as exc:
        get_run_logger().warning("%s failed round %d (%s: %s); the federation goes on without it and it resumes "
                                 "from its work dir when next drawn", name, round_number, type(exc).__name__, exc)
        return False


@dataclass(frozen=True)
class _Submission:
    """What every leaf's task is submitted with, but its leaf, round and attempt: the platform
    connection, participant, leaves (name: index, credentials, credentials file), work root,
    timeouts, update policy and branch."""

    connection: tuple[str, str, str | None]
    participant: str
    participant_options: dict[str, Any]
    leaves: dict[str, tuple[int, BranchKeyCredentials, Path]]
    root: Path
    timeouts: Timeouts
    policy: UpdatePolicy
    branch: str

    def submit(self, name: str, round_number: int, drawn_for: tuple[int, int] | None,
               attempt: int = 0) -> PrefectFuture[RoundResult]:
        """Submit leaf `name`'s round (`<leaf>-round-<n>`, then `-again-<k>` for a later attempt)."""
        index, block, path = self.leaves[name]
        options = {**self.participant_options, "leaf_index": index, "leaves": len(self.leaves)}
        run_name = f"{name}-round-{round_number}" + (f"-again-{attempt}" if attempt else "")
        return leaf_round.with_options(task_run_name=run_name, tags=run_tags(block, self.branch)).submit(
            path, self.connection, self.participant, options, self.root / name, self.timeouts, self.policy, drawn_for)


@dataclass
class _DrawnRound:
    """One round while its drawn leaves' tasks run: the platform's (run, round) they were drawn
    for (None when the platform does not say), each leaf's latest future and how many times it was
    submitted again; `platform` is a leaf's credentials to ask the platform whether it is still open."""

    submission: _Submission
    number: int
    drawn_for: tuple[int, int] | None
    platform: BranchKeyCredentials
    futures: dict[str, PrefectFuture[RoundResult]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def again(self, name: str, lost: str) -> PrefectFuture[RoundResult] | None:
        """Leaf `name`'s round submitted again after its task ended with its worker lost (`lost`
        says how), said in the log; None, said as an error, when the round has closed since or the
        leaf was submitted again RESUBMISSIONS times already: the round then misses its update."""
        logger = get_run_logger()
        attempt = self.attempts.get(name, 0) + 1
        if attempt > RESUBMISSIONS:
            logger.error("%s lost its worker in round %d again (%s) after %d new attempts: round %d misses its update",
                         name, self.number, lost, RESUBMISSIONS, self.number)
            return None
        if self.drawn_for is not None and _open_round(self.platform) not in (self.drawn_for, None):
            logger.error("%s lost its worker in round %d (%s) and the round has closed since: its aggregate misses "
                         "this leaf's update", name, self.number, lost)
            return None
        logger.warning("%s lost its worker in round %d (%s): its round is submitted again and resumes from its work "
                       "dir", name, self.number, lost)
        _release(self.futures[name])
        self.attempts[name] = attempt
        self.futures[name] = self.submission.submit(name, self.number, self.drawn_for, attempt)
        return self.futures[name]

    def release(self) -> None:
        """Let Dask forget the round's tasks once their results are read: a task whose result
        stayed on a worker that is lost later would be run again by Dask, an old round's leaf
        task starting anew."""
        for future in self.futures.values():
            _release(future)


def _await_round(drawn: _DrawnRound, watch: ClusterWatch | None, published: Callable[[list[str]], None]) -> None:
    """Until every drawn leaf's task has ended: the cluster looked at about once per
    FEDERATION_REFRESH_S (`ClusterWatch.check`: lost workers said and, in a local cluster,
    replaced), a leaf whose task ended with its worker lost submitted again (`_DrawnRound.again`),
    and `published` called with the leaves whose tasks ended (at most once per
    FEDERATION_REFRESH_S: each publication is two writes to the Prefect server)."""
    pending = {name: _wrapped(future) for name, future in drawn.futures.items()}
    published_at = time.monotonic() - FEDERATION_REFRESH_S
    while pending:
        if watch is not None:
            watch.leaves = {str(future.key): f"{name} (round {drawn.number})" for name, future in pending.items()
                            if isinstance(future, distributed.Future)}
            watch.check()
        _wait_any(list(pending.values()), FEDERATION_REFRESH_S)
        time.sleep(max(0.0, published_at + FEDERATION_REFRESH_S - time.monotonic()))
        ended = []
        for name in [name for name, future in pending.items() if future.done()]:
            lost = _lost_worker(pending[name])
            again = drawn.again(name, lost) if lost is not None else None
            if again is not None:
                pending[name] = _wrapped(again)
            else:
                del pending[name]
                ended.append(name)
        if ended:
            published(ended)
            published_at = time.monotonic()


def _wrapped(future: PrefectFuture[RoundResult]) -> Any:
    """The runner's own future under a Prefect future: Dask's, or the standard library's for a thread pool."""
    # submit() is typed PrefectFuture; the runners here return PrefectWrappedFuture.
    return future.wrapped_future  # type: ignore[attr-defined]


def _release(future: PrefectFuture[RoundResult]) -> None:
    """Release the Dask future under a Prefect future (nothing for another runner's)."""
    wrapped = _wrapped(future)
    if isinstance(wrapped, distributed.Future):
        wrapped.release()


def _lost_worker(wrapped: Any) -> str | None:
    """How a leaf's ended Dask task lost its worker (Dask gave up on it, its connection closed,
    it was cancelled, or its Prefect task run crashed), or None when it did not."""
    if not isinstance(wrapped, distributed.Future):
        return None
    if wrapped.status == "cancelled":
        return "its Dask task was cancelled"
    if wrapped.status == "error":
        error = wrapped.exception()
        return f"{type(error).__name__}: {error}" if isinstance(error, distributed.KilledWorker | CommClosedError) \
            else None
    state = wrapped.result() if wrapped.status == "finished" else None
    return f"its task run crashed: {state.message}" if isinstance(state, State) and state.is_crashed() else None


def _cluster_watch(needed: int) -> ClusterWatch | None:
    """A watch over the flow's Dask cluster, which must run `needed` tasks at once (None under
    another task runner)."""
    context = FlowRunContext.get()
    client = dask_client_of(context.task_runner) if context is not None else None
    return ClusterWatch(client, needed) if client is not None else None


def _check_capacity(watch: ClusterWatch | None, round_number: int) -> None:
    """Before a round: the cluster runs its whole draw at once (a local cluster is restored, a
    remote one given time to replace lost workers), or SimulationError: every round would wait out
    its deadline without the leaves that do not fit."""
    if watch is None or watch.wait_for_capacity():
        return
    raise SimulationError(f"round {round_number} cannot start: the Dask cluster runs {watch.threads} tasks at once "
                          f"since it lost workers, and a round's {watch.needed} drawn leaves wait for each other's "
                          "uploads; the simulation stops")


def _open_round(block: BranchKeyCredentials) -> tuple[int, int] | None:
    """The platform's open (run, round), the round the leaves are drawn for; None when the
    platform does not say (or cannot be asked now): the leaves then follow the platform."""
    try:
        with LeafSession(block) as session:
            details = session.client.run_details()
    except BranchKeyError as exc:
        get_run_logger().warning("could not read the platform's open round (%s): this round's leaves follow the "
                                 "platform's", exc)
        return None
    return (details.run_number, details.round) if details.run_status == "start" and details.round is not None else None


def _publish_ended(branch: str, work_dirs: dict[str, Path], histories: dict[str, list[dict[str, Any]]],
                   ended: list[str]) -> None:
    """Read again the histories of the leaves whose tasks ended (a round records its row just
    before) and republish the federation artifacts; undrawn leaves record nothing, so theirs stay
    as read."""
    for name in ended:
        histories[name] = history_rows(work_dirs[name])
    _publish_safely(branch, histories)


def _publish_safely(branch: str, histories: dict[str, list[dict[str, Any]]]) -> None:
    """Publish the federation artifacts; a Prefect server that does not answer is logged, not fatal
    (the next leaf's end publishes again)."""
    try:
        publish_federation_artifacts(branch, histories)
    except (httpx.HTTPError, PrefectException) as exc:
        get_run_logger().warning("could not publish the federation artifacts (retrying): %s", exc)


def _wait_any(futures: list[Any], timeout: float) -> None:
    """Until one of the futures (Dask's or the standard library's) is done, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not any(f.done() for f in futures) and time.monotonic() < deadline:
        time.sleep(POLL_S)
