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
the cluster must run that many tasks at once: a local cluster is sized for it, a cluster by
address is refused when it has fewer threads.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import PrefectException
from prefect.futures import PrefectFuture

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.errors import BranchKeyError, MissingExtraError, UsageError
from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.flows.federation.leaves import leaf_block, leaf_credentials, leaf_files
from prefect_branchkey.flows.federation.sampling import SamplingPlan, sampling_plan
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.promotion import promotion_policy
from prefect_branchkey.flows.leaf.state import hold_work_dir
from prefect_branchkey.flows.participant import Participant, ParticipantError, load_participant, participant_class
from prefect_branchkey.flows.publishing.observability import (
    artifact_key,
    label_flow_run,
    publish_federation_artifacts,
    run_tags,
)
from prefect_branchkey.flows.round import RoundResult, Timeouts, round_in_step
from prefect_branchkey.flows.updates.privacy import PrivacySettings
from prefect_branchkey.flows.updates.transforms import UpdatePolicy, UpdateSettings, update_policy

try:
    import distributed
    from prefect_dask import DaskTaskRunner
except ImportError as exc:
    raise MissingExtraError("A simulated federation", "simulation", exc) from None
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


class SimulationError(BranchKeyError, ValueError):
    """A simulation that cannot start as asked (no leaves, no cluster at the address, too few threads)."""


def dask_runner(address: str | None, workers: int | None, tasks_at_once: int) -> DaskTaskRunner:
    """The task runner: the cluster at `address` (refused, naming it, when it does not answer or has
    fewer than `tasks_at_once` threads), else a local cluster of `workers` processes (default: one
    per core) with threads enough for `tasks_at_once` leaves."""
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
        "n_workers": processes, "threads_per_worker": math.ceil(tasks_at_once / processes), "processes": True,
        "dashboard_address": None})


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
               options: dict[str, Any], work_dir: Path, timeouts: Timeouts, policy: UpdatePolicy) -> RoundResult:
    """One leaf's round on a Dask worker: its credentials read there from their file (no token
    travels with the task), its participant kept by the worker between rounds, the round resumed
    from the leaf's work dir if an earlier attempt (on any worker) stopped mid-way."""
    block = leaf_block(credentials_file, *connection)
    model = worker_participant(block.leaf_name, participant, json.dumps(options, sort_keys=True))
    with hold_work_dir(work_dir), LeafSession(block) as session, tags(*run_tags(block, session.branch_name)):
        return round_in_step(session, model, work_dir, timeouts, policy, promotion_policy(model))


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
    (`simulate` sets one up); returns each leaf's round results. Fails when every drawn leaf of a
    round failed (nothing trains), or a leaf's participant or settings were refused; and at the
    end, when any round went on without some of its drawn leaves (they failed it), naming them."""
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
    policy = update_policy(update, privacy)
    timeouts = Timeouts(aggregation_s=aggregation_timeout_s)
    by_name = {b.leaf_name: (i, b, path) for i, (b, path) in enumerate(zip(blocks, files, strict=True))}
    results: dict[str, list[RoundResult]] = {b.leaf_name: [] for b in blocks}
    incomplete: dict[int, list[str]] = {}
    work_dirs = {b.leaf_name: root / b.leaf_name for b in blocks}
    histories = {name: history_rows(path) for name, path in work_dirs.items()}
    for round_number in range(1, rounds + 1):
        futures = {}
        for name in plan.chosen(round_number):
            index, block, path = by_name[name]
            options = {**(participant_options or {}), "leaf_index": index, "leaves": len(blocks)}
            futures[name] = leaf_round.with_options(task_run_name=f"{name}-round-{round_number}",
                                                    tags=run_tags(block, branch)).submit(
                path, (host, transport, amqp_host), participant, options, root / name, timeouts, policy)
        _publish_while_running(branch, work_dirs, histories, futures)
        failed = [name for name, future in futures.items() if not _collect(name, future, results[name], round_number)]
        if len(failed) == len(futures):
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


def _publish_while_running(branch: str, work_dirs: dict[str, Path], histories: dict[str, list[dict[str, Any]]],
                           futures: dict[str, PrefectFuture]) -> None:
    """Republish the federation artifacts as the drawn leaves' tasks (`futures`) end, until every
    one of the round has (at most once per FEDERATION_REFRESH_S: each publication is two writes to
    the Prefect server). A leaf's history in `histories` is read again when its task ends, as a
    round records its row just before; undrawn leaves record nothing, so theirs stay as read."""
    # submit() is typed PrefectFuture; the runners here return PrefectWrappedFuture (Dask's or a thread pool's).
    pending = {name: f.wrapped_future for name, f in futures.items()}  # type: ignore[attr-defined]
    published = time.monotonic() - FEDERATION_REFRESH_S
    while pending:
        _wait_any(list(pending.values()), FEDERATION_REFRESH_S)
        time.sleep(max(0.0, published + FEDERATION_REFRESH_S - time.monotonic()))
        ended = [name for name, future in pending.items() if future.done()]
        for name in ended:
            del pending[name]
            histories[name] = history_rows(work_dirs[name])
        if ended:
            _publish_safely(branch, histories)
            published = time.monotonic()


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
