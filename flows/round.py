"""One federated round for one leaf, resumable at every step.

wait for run -> check the leaf is in step -> train -> write archive -> upload -> wait for
aggregation -> download -> evaluate -> send metrics -> judge the model (best, served:
`prefect_branchkey.flows.leaf.promotion`) -> record history. After each step
the leaf's state is saved in its work directory; a rerun continues from the step that did
not finish.

The leaf's round is the platform's round. When the platform says which round is open (and
which aggregation is the latest), a leaf that is out of step (restored from an old state,
offline for rounds, a missed notice) resyncs: it adopts the latest aggregate, moves its
counter, records a `resynced` row, and only then trains; an update for a round that closed
meanwhile is refused by the platform and never counted in a later one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, tags
from prefect.runtime import flow_run
from prefect.states import State

from prefect_branchkey.bk_blocks import (
    AggregationRef,
    AggregationTimeoutError,
    BranchKeyCredentials,
    OutOfSyncError,
    RequestRefusedError,
    RunDetails,
    RunNotStartedError,
    RunStoppedError,
)
from prefect_branchkey.bk_blocks.archive import AggregateLayers, write_update
from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.bk_blocks.protocol import MetricsMode
from prefect_branchkey.flows.leaf.audit import AuditTrail, archive_facts, leaf_facts, received_facts
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_rows, utc_from_timestamp
from prefect_branchkey.flows.leaf.promotion import PromotionPolicy, PromotionSettings, promote, promotion_policy
from prefect_branchkey.flows.leaf.retention import RetentionSettings, apply_retention
from prefect_branchkey.flows.leaf.setup import leaf_setup
from prefect_branchkey.flows.leaf.state import (
    LeafBusyError,
    LeafState,
    cancelled_as_busy,
    hold_work_dir,
    load_state,
    save_state,
)
from prefect_branchkey.flows.participant import Participant, check_result
from prefect_branchkey.flows.publishing.observability import emit_round_event, label_flow_run, run_tags
from prefect_branchkey.flows.publishing.publication import Publication, publishing
from prefect_branchkey.flows.publishing.registry import RegistrySettings, load_registry, stage_promoted
from prefect_branchkey.flows.updates.deltas import GlobalModel
from prefect_branchkey.flows.updates.privacy import (
    PrivacyLedger,
    PrivacySettings,
    account_noised_update,
    check_budget_at_start,
    epsilon_past_budget,
    privacy_facts,
)
from prefect_branchkey.flows.updates.transforms import (
    RECENT_NORMS,
    UpdatePolicy,
    UpdateSettings,
    load_global_model,
    prepare_update,
    update_policy,
)
from prefect_branchkey.tasks import (
    LeafSession,
    current_run,
    download_aggregate,
    idempotency_key,
    round_metrics_key,
    run_logger,
    send_metrics,
    upload_weights,
    wait_for_aggregation,
    wait_for_run,
)

# How often a leaf asks whether the platform's aggregation of a closed round is done.
SETTLE_POLL_S = 0.2

# Resyncs one `federated-round` run may make before it ends (one before training and one after a
# refused upload is the most a federation that is not moving faster than the leaf needs).
MAX_RESYNCS = 3


@dataclass(frozen=True)
class Timeouts:
    """How long a round may wait for the platform, in seconds."""

    run_s: float = 6 * 3600
    aggregation_s: float = 3600
    run_poll_s: float = 10


@dataclass
class RoundResult:
    """What a round ended as: `completed`, `declined` (the participant sat it out), `stopped`, or
    `resynced` (the leaf was out of step and moved to the platform's open round, uploading nothing;
    `round` is then that open round)."""

    status: str
    run_number: int
    round: int
    record: RoundRecord | None = None
    global_model: str | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)


def run_round(
    session: LeafSession,
    participant: Participant,
    work_dir: Path,
    timeouts: Timeouts = Timeouts(),
    publication: Publication | None = None,
    policy: UpdatePolicy = UpdatePolicy(),  # noqa: B008 -- a frozen pydantic model, safe to share
    promotion: PromotionPolicy | None = None,
    retention: RetentionSettings | None = None,
    registry: RegistrySettings | None = None,
) -> RoundResult:
    """Run (or resume) the leaf's current round; state is saved after every step. The rows it
    recorded (`completed`, `resynced`) are published in the background by `publication` (a
    training run's), else by one this call opens and closes, everything published, at its end.
    `promotion` judges the new global model (default: by the participant's primary metric);
    once the round has ended, `retention` deletes the updates and models past its counts. With a
    `registry` (here, or the publication's), a promoted global model is staged for MLflow."""
    work_dir = Path(work_dir)
    promotion = promotion or promotion_policy(participant)
    with (nullcontext(publication) if publication
          else publishing(session.credentials.leaf_name, work_dir, registry)) as pub:
        try:
            result = _run_round(session, participant, work_dir, timeouts, policy, promotion, pub.registry is not None)
        finally:
            pub.notify()
    apply_retention(work_dir, load_state(work_dir, session.credentials.leaf_id), retention or RetentionSettings())
    return result


def _run_round(session: LeafSession, participant: Participant, work_dir: Path,
               timeouts: Timeouts, policy: UpdatePolicy, promotion: PromotionPolicy, staging: bool) -> RoundResult:
    """The round, or `resynced` when the leaf turned out to be out of step and resynced instead
    (nothing uploaded): the caller decides whether the platform's open round is one to run."""
    try:
        return _attempt_round(session, participant, work_dir, timeouts, policy, promotion, staging)
    except OutOfSyncError as exc:
        record = _resync(session, work_dir, timeouts, str(exc))
        state = load_state(work_dir, session.credentials.leaf_id)
        return RoundResult("resynced", state.run_number, state.round, record, state.global_model)


def _attempt_round(session: LeafSession, participant: Participant, work_dir: Path,
                   timeouts: Timeouts, policy: UpdatePolicy, promotion: PromotionPolicy,
                   staging: bool) -> RoundResult:
    state = load_state(work_dir, session.credentials.leaf_id)
    resumed = state.phase != "idle"
    try:
        if not resumed:
            details = _settled_run(session, state.round, timeouts)
            if details.run_status == "stop":
                return RoundResult("stopped", details.run_number, state.round)
            state.start_round(details.run_number)
            _check_in_step(state, details)
            if not participant.participate(state.round):
                run_logger(__name__).info("participant declined round %d", state.round)
                save_state(work_dir, state)
                return RoundResult("declined", state.run_number, state.round)
            if _budget_spent(session, work_dir, state, policy.privacy):
                return RoundResult("budget-spent", state.run_number, state.round)
            _train(participant, work_dir, state, policy)
        return _finish(session, participant, work_dir, state, timeouts, resumed, promotion, staging)
    except RunStoppedError:
        state.clear_round()
        save_state(work_dir, state)
        return RoundResult("stopped", state.run_number, state.round)
    except OutOfSyncError:
        raise
    except Exception as exc:
        emit_round_event(_record(session, state, "failed"), failed=True, error=f"{type(exc).__name__}: {exc}")
        raise


def _finish(session: LeafSession, participant: Participant, work_dir: Path, state: LeafState,
            timeouts: Timeouts, resumed: bool, promotion: PromotionPolicy, staging: bool) -> RoundResult:
    if state.phase == "trained":
        _upload(session, work_dir, state, timeouts, mark=not resumed)
    if state.phase == "uploaded":
        _await_aggregation(session, work_dir, state, timeouts, resumed)
    if state.phase == "aggregated":
        _download(session, work_dir, state)
    return _evaluate_and_record(session, participant, work_dir, state, promotion, staging)


def _timed(state: LeafState, step: str, started: float) -> None:
    state.durations[step] = state.durations.get(step, 0.0) + time.perf_counter() - started


def _train(participant: Participant, work_dir: Path, state: LeafState, policy: UpdatePolicy) -> None:
    """Train from the global model, then check, guard, privatize and cast the update
    (`update_transforms`) and write the archive the round uploads; nothing is saved when the
    update is refused."""
    state.started_at = time.time()
    started = time.perf_counter()
    global_model = _global_model(participant, state)
    with _reference(state, global_model, participant) as reference:
        result = check_result(participant.train(global_model, state.round))
        prepared = prepare_update(result.parameters, reference, policy, _recent_norms(work_dir, state, policy),
                                  trained_dtypes=state.model_dtypes if state.global_model else ())
        archive = write_update(work_dir / "updates" / f"run{state.run_number}-round{state.round}.npz",
                               result.weighting, prepared.parameters)
    _timed(state, "train_s", started)
    state.archive, state.weighting, state.train_metrics = str(archive), result.weighting, dict(result.metrics)
    state.update_facts = {"update_norm": prepared.update_norm, "upload_precision": prepared.precision}
    state.update_facts |= account_noised_update(work_dir, policy.privacy)
    state.model_dtypes = [layer.dtype.str for layer in result.parameters]
    state.phase = "trained"
    save_state(work_dir, state)


def _recent_norms(work_dir: Path, state: LeafState, policy: UpdatePolicy) -> list[float]:
    """The update norms of the leaf's latest completed rounds of this run, for the norm guard
    (not read when the guard is off)."""
    if policy.max_update_norm_ratio is None:
        return []
    return [row["update_norm"] for row in history_rows(work_dir, last=RECENT_NORMS)
            if row["status"] == "completed" and row["run_number"] == state.run_number]


def _budget_spent(session: LeafSession, work_dir: Path, state: LeafState, privacy: PrivacySettings) -> bool:
    """Whether this round would take the leaf past its DP budget; if so the round is declined
    (nothing trained or uploaded), said in the log, a `budget-spent` history row and its event."""
    ledger = PrivacyLedger(work_dir)
    after = epsilon_past_budget(privacy, ledger)
    if after is None:
        return False
    state.update_facts = privacy_facts(ledger, privacy)
    record = _record(session, state, "budget-spent")
    append_record(work_dir, record)
    emit_round_event(record)
    run_logger(__name__).warning("round %d declined: it would take this leaf to epsilon %.3g (delta %g), past its "
                                 "budget of %g; nothing was trained or uploaded", state.round, after, privacy.delta,
                                 privacy.epsilon_budget)
    state.clear_round()
    save_state(work_dir, state)
    return True


def _global_model(participant: Participant, state: LeafState) -> list[np.ndarray] | None:
    """The global model the leaf holds, as its participant takes it (in its live arrays when it
    offers them, else new arrays in its dtypes); None before the run's first aggregate."""
    return load_global_model(participant, Path(state.global_model), state.model_dtypes) if state.global_model else None


@contextmanager
def _reference(state: LeafState, global_model: list[np.ndarray] | None,
               participant: Participant) -> Iterator[GlobalModel | None]:
    """What the update is compared with: the global model's archive, read chunk by chunk, when
    the participant trains in its live arrays (they hold the update by then), else the arrays."""
    if global_model is None or participant.parameters() is None or state.global_model is None:
        yield global_model
        return
    with AggregateLayers(state.global_model) as layers:
        yield layers


def _upload(session: LeafSession, work_dir: Path, state: LeafState, timeouts: Timeouts,
            mark: bool) -> None:
    """Upload the round's archive; a pause waits, a stop (or a new run) ends the round.

    A fresh round marks the notice stream first, so only a later notice answers it. A
    resumed round does not: its upload may already have been accepted before the crash
    and its aggregation announced, so the latest notice not yet consumed answers it. The audit
    trail records the upload before its first byte leaves and confirms it once accepted.
    """
    started = time.perf_counter()
    if mark:
        session.forget_mark(state.run_number, state.round)
    archive = Path(state.archive or "")
    sha256 = sha256_file(archive).hex()
    key = idempotency_key(session.credentials.leaf_id, state.run_number, state.round, sha256)
    trail = AuditTrail(work_dir, state.audit_head)
    trail.sending("upload", key, leaf_facts(session, state.run_number, state.round) | archive_facts(archive, sha256)
                  | state.update_facts)
    while True:
        try:
            receipt = upload_weights(session, archive, state.round, state.run_number, name_round=True, mark=mark,
                                     sha256=sha256)
            break
        except RunNotStartedError as exc:
            details = wait_for_run(session, state.round, timeouts.run_poll_s, timeouts.run_s)
            if details.run_status == "stop" or details.run_number != state.run_number:
                state.audit_head = trail.refused("upload", key, exc)
                raise RunStoppedError(f"run {state.run_number} ended before round {state.round} was uploaded") from None
        except RequestRefusedError as exc:
            state.audit_head = trail.refused("upload", key, exc)
            raise
    _timed(state, "upload_s", started)
    state.audit_head = trail.confirmed("upload", key, {"file_id": receipt.file_id, "counted_in": receipt.counted_in})
    state.payloads_sent += 1
    state.file_id, state.idempotency_key, state.bytes_up = receipt.file_id, receipt.idempotency_key, receipt.size
    state.counted_in = list(receipt.counted_in) if receipt.counted_in else None
    state.phase = "uploaded"
    save_state(work_dir, state)
    if receipt.aggregation_id:
        # The round's aggregate already existed when the platform answered: no wait.
        state.aggregation_id, state.phase = receipt.aggregation_id, "aggregated"
        save_state(work_dir, state)


def _await_aggregation(session: LeafSession, work_dir: Path, state: LeafState, timeouts: Timeouts,
                       resumed: bool) -> None:
    """Wait for the round's aggregation, bounded by `timeouts.aggregation_s`.

    A resumed wait first asks the platform (its aggregation may have been announced while the
    leaf was down). A wait that runs out fails the round and is marked expired: against a
    platform that cannot say where the federation is, the next run abandons the round and
    rejoins with fresh training rather than waiting again for a notice that is gone.
    """
    counted_in = (state.counted_in[0], state.counted_in[1]) if state.counted_in else None
    if resumed and state.wait_expired and counted_in is None:
        raise OutOfSyncError(f"round {state.round}'s wait for its aggregation ran out in an earlier run and the "
                             "platform does not say which round it is at")
    started = time.perf_counter()
    try:
        aggregation_id = wait_for_aggregation(
            session, state.round, state.run_number, exclude=list(state.consumed_aggregations),
            timeout_s=timeouts.aggregation_s,
            counted_in=counted_in, catch_up_first=resumed,
        )
    except AggregationTimeoutError:
        state.wait_expired = True
        save_state(work_dir, state)
        raise
    _timed(state, "wait_s", started)
    updates = session.notice_extras.pop(aggregation_id, {}).get("updates")
    state.aggregate_facts = {"updates_aggregated": updates} if isinstance(updates, int) else {}
    state.aggregation_id, state.phase = aggregation_id, "aggregated"
    save_state(work_dir, state)
    session.client.acknowledge(aggregation_id)


def _download(session: LeafSession, work_dir: Path, state: LeafState) -> None:
    started = time.perf_counter()
    path = download_aggregate(session, state.aggregation_id or "", work_dir / "models", state.round)
    _timed(state, "download_s", started)
    _audit_download(session, work_dir, state, state.aggregation_id or "", state.round, path)
    state.global_model, state.bytes_down = str(path), path.stat().st_size
    state.consumed_aggregations = [*state.consumed_aggregations, state.aggregation_id or ""][-1000:]
    state.phase = "downloaded"
    save_state(work_dir, state)


def _audit_download(session: LeafSession, work_dir: Path, state: LeafState, aggregation_id: str,
                    round_number: int, path: Path) -> None:
    """Record a global model that arrived (the aggregate of `round_number`) in the audit trail, once
    per aggregation."""
    facts = leaf_facts(session, state.run_number, round_number) | {"aggregation_id": aggregation_id}
    trail = AuditTrail(work_dir, state.audit_head)
    state.audit_head = trail.received("download", aggregation_id, facts | received_facts(path))


def _evaluate_and_record(session: LeafSession, participant: Participant, work_dir: Path,
                         state: LeafState, promotion: PromotionPolicy, staging: bool) -> RoundResult:
    """Send the round's metrics, judge its model (staging a promoted one for the registry when
    `staging`), record its history row, and move the leaf to its next round."""
    _send_round_metrics(session, participant, work_dir, state)
    promote(participant, work_dir, state, promotion)
    if staging and state.model_facts.get("served") and state.global_model:
        stage_promoted(work_dir, state.aggregation_id or "", Path(state.global_model), participant.export_model,
                       session.credentials.leaf_name)
    eval_metrics = dict(state.eval_metrics)
    record = _record(session, state, "completed", eval_metrics)
    append_record(work_dir, record)
    result = RoundResult("completed", state.run_number, state.round, record, state.global_model, eval_metrics)
    state.round += 1
    state.clear_round()
    save_state(work_dir, state)
    return result


def _send_round_metrics(session: LeafSession, participant: Participant, work_dir: Path,
                        state: LeafState) -> None:
    """Evaluate the global model (once: the result is saved before anything is sent), then send
    the train and test metrics, recording each mode as sent. A kill between a send and its record
    resends it under the same idempotency key, which the platform stores once."""
    if not state.evaluated:
        started = time.perf_counter()
        state.eval_metrics = participant.evaluate(_global_model(participant, state) or [], state.round)
        _timed(state, "evaluate_s", started)
        state.evaluated = True
        save_state(work_dir, state)
    aggregation_id = state.aggregation_id or ""
    sends: tuple[tuple[MetricsMode, dict[str, float]], ...] = (("train", state.train_metrics),
                                                             ("test", state.eval_metrics))
    trail = AuditTrail(work_dir, state.audit_head)
    for mode, metrics in sends:
        if metrics and mode not in state.sent_metrics:
            key = round_metrics_key(session.credentials.leaf_id, aggregation_id, mode)
            trail.sending("metrics", key, leaf_facts(session, state.run_number, state.round)
                          | {"aggregation_id": aggregation_id, "mode": mode, "metrics": dict(metrics)})
            try:
                send_metrics(session, aggregation_id, metrics, state.round, mode=mode, idempotency_key=key)
            except RequestRefusedError as exc:
                state.audit_head = trail.refused("metrics", key, exc)
                raise
            state.audit_head = trail.confirmed("metrics", key)
            state.payloads_sent += 1
            state.sent_metrics = [*state.sent_metrics, mode]
            save_state(work_dir, state)


def _settled_run(session: LeafSession, round_number: int, timeouts: Timeouts) -> RunDetails:
    """The run, once no round of it is being aggregated: until then the open round's model (the
    aggregate being written) does not exist yet, and a leaf would train on an older one. Bounded
    by the aggregation timeout; a platform that does not say what it aggregates is not waited on."""
    details = current_run(session, round_number, timeouts.run_poll_s, timeouts.run_s)
    deadline = time.monotonic() + timeouts.aggregation_s
    while details.aggregating and details.run_status != "stop" and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL_S)
        details = current_run(session, round_number, timeouts.run_poll_s, timeouts.run_s)
    return details


def _check_in_step(state: LeafState, details: RunDetails) -> None:
    """Raise `OutOfSyncError` unless the leaf's round and model are the platform's open round and
    latest aggregate (only checkable when the platform says which round is open)."""
    if not details.tells_round:
        return
    latest = details.latest_aggregation
    platform_model = latest.aggregation_id if latest and latest.run_number == details.run_number else None
    if ((state.run_number, state.round) != (details.run_number, details.round)
            or state.last_aggregation != platform_model):
        raise OutOfSyncError(
            f"the leaf is at run {state.run_number} round {state.round} with model "
            f"{state.last_aggregation or 'none'}, the platform at run {details.run_number} round {details.round} "
            f"with model {platform_model or 'none'}")


def _resync(session: LeafSession, work_dir: Path, timeouts: Timeouts,
            reason: str) -> RoundRecord | None:
    """Bring the leaf to the platform's round: adopt the run's latest aggregate (if any), move the
    counter, drop the round in progress (its update, if accepted, counted where it landed),
    record a `resynced` row. Nothing is uploaded."""
    logger = run_logger(__name__)
    state = load_state(work_dir, session.credentials.leaf_id)
    details = _settled_run(session, state.round, timeouts)
    before = f"run {state.run_number} round {state.round} ({state.phase})"
    if details.run_status == "stop" or not details.tells_round:
        logger.warning("out of step (%s) and the platform does not say which round is open (run %s): abandoning "
                       "%s and starting the round again", reason, details.run_status, before)
        state.clear_round()
        save_state(work_dir, state)
        return None
    counted = state.file_id if state.phase in ("uploaded", "aggregated") else None
    adopted = _adopt(session, work_dir, state, details)
    record = _record_resync(session, work_dir, state, adopted, counted, details)
    logger.warning("resynced with the platform (%s): the leaf was at %s, now at run %d round %d with aggregation "
                   "%s; no update was sent for the rounds it missed", reason, before, state.run_number, state.round,
                   state.last_aggregation or "none")
    return record


def _adopt(session: LeafSession, work_dir: Path, state: LeafState,
           details: RunDetails) -> AggregationRef | None:
    """Move `state` to the platform's run and open round with the run's latest aggregate as its
    model (downloaded unless the leaf has it); return that aggregate, None when the run has none."""
    latest = details.latest_aggregation
    adopted = latest if latest and latest.run_number == details.run_number else None
    if details.run_number != state.run_number:
        state.run_number, state.consumed_aggregations, state.global_model = details.run_number, [], None
    state.clear_round()
    state.started_at = time.time()
    if adopted is not None and adopted.aggregation_id != state.last_aggregation:
        path = download_aggregate(session, adopted.aggregation_id, work_dir / "models", adopted.round)
        _audit_download(session, work_dir, state, adopted.aggregation_id, adopted.round, path)
        state.global_model, state.bytes_down = str(path), path.stat().st_size
        state.consumed_aggregations = [*state.consumed_aggregations, adopted.aggregation_id][-1000:]
    state.round = details.round or 1
    return adopted


def _record_resync(session: LeafSession, work_dir: Path, state: LeafState,
                   adopted: AggregationRef | None, counted: str | None, details: RunDetails) -> RoundRecord:
    """Write the `resynced` row (at the round whose aggregate was adopted, else the round before
    the open one, so it sorts before the row of the round the leaf completes next) and the
    state, now idle in the open round."""
    record = _record(session, state, "resynced")
    record.round = adopted.round if adopted else max((details.round or 1) - 1, 0)
    record.file_id, record.aggregation_id = counted, adopted.aggregation_id if adopted else None
    append_record(work_dir, record)
    state.clear_round()
    save_state(work_dir, state)
    return record


def _record(session: LeafSession, state: LeafState, status: str,
            eval_metrics: dict[str, float] | None = None) -> RoundRecord:
    leaf = session.credentials
    durations = state.durations
    finished = time.time()
    return RoundRecord(
        branch_id=leaf.branch_id, leaf_id=leaf.leaf_id, leaf_name=leaf.leaf_name,
        run_number=state.run_number, round=state.round, status=status, file_id=state.file_id,
        aggregation_id=state.aggregation_id, weighting=state.weighting, train_metrics=dict(state.train_metrics),
        eval_metrics=dict(eval_metrics or {}), train_s=durations.get("train_s"), upload_s=durations.get("upload_s"),
        wait_s=durations.get("wait_s"), download_s=durations.get("download_s"),
        evaluate_s=durations.get("evaluate_s"),
        round_s=finished - state.started_at if state.started_at else None, bytes_up=state.bytes_up,
        bytes_down=state.bytes_down, started_at=utc_from_timestamp(state.started_at),
        finished_at=utc_from_timestamp(finished), flow_run_id=flow_run.get_id(), tree_id=leaf.tree_id,
        branch_name=session.branch_name, payloads_sent=state.payloads_sent, audit_head=state.audit_head,
        **state.update_facts, **state.model_facts, **state.aggregate_facts,
    )


def round_name(credentials: BranchKeyCredentials, round_number: int) -> str:
    """A round's flow run name: the leaf and the round, as the UI lists it."""
    return f"{credentials.leaf_name}-round-{round_number}"


@flow(name="federated-round")
def federated_round(
    credentials: BranchKeyCredentials | str,
    participant: str,
    work_dir: str,
    participant_options: dict[str, Any] | None = None,
    aggregation_timeout_s: float = 3600,
    run_timeout_s: float = 6 * 3600,
    update: UpdateSettings = UpdateSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    privacy: PrivacySettings = PrivacySettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    promotion: PromotionSettings = PromotionSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    retention: RetentionSettings = RetentionSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    registry: str | None = None,
) -> RoundResult | State:
    """One federated round for one leaf (or the rest of an interrupted one).

    `participant` is `"package.module:Class"`, built with `participant_options`;
    `work_dir` holds the leaf's state, models and history between runs (`~` and
    `$VARIABLES` are expanded on the machine that runs the round). The run is named
    `<leaf>-round-<n>` and tagged by leaf and branch; it ends Cancelled if another run of
    the leaf holds the work dir. `update` (upload precision, update guard), `privacy`
    (differential privacy; off by default) and `promotion` (which global model is served) are
    typed groups of settings, as is `retention` (how many past updates and global models the
    work dir keeps); a bad or misspelt value, or a DP budget already spent, fails the run
    before the round. `registry` names an `MlflowRegistry` Block (the `mlflow` extra): each global
    model the leaf promotes is then registered there, in the background.
    """
    policy = update_policy(update, privacy)
    registry_settings = load_registry(registry)
    leaf = leaf_setup(credentials, work_dir, participant, participant_options, promotion)
    block, directory = leaf.credentials, leaf.work_dir
    try:
        with hold_work_dir(directory), LeafSession(block) as session, tags(*run_tags(block, session.branch_name)):
            state = load_state(directory, block.leaf_id)
            check_budget_at_start(policy.privacy, directory, state.phase != "idle")
            expected = state.round
            label_flow_run(round_name(block, expected), run_tags(block, session.branch_name))
            result = round_in_step(session, leaf.participant, directory,
                                   Timeouts(run_s=run_timeout_s, aggregation_s=aggregation_timeout_s), policy,
                                   leaf.promotion, retention, registry_settings)
    except LeafBusyError as exc:
        return cancelled_as_busy(exc)
    if result.round != expected:
        label_flow_run(round_name(block, result.round), [])
    return result


def round_in_step(session: LeafSession, participant: Participant, work_dir: Path,
                  timeouts: Timeouts, policy: UpdatePolicy, promotion: PromotionPolicy,
                  retention: RetentionSettings | None = None, registry: RegistrySettings | None = None) -> RoundResult:
    """The leaf's round; after a resync, the platform's open round (up to MAX_RESYNCS times)."""
    result = run_round(session, participant, work_dir, timeouts, policy=policy, promotion=promotion,
                       retention=retention, registry=registry)
    for _ in range(MAX_RESYNCS):
        if result.status != "resynced":
            break
        result = run_round(session, participant, work_dir, timeouts, policy=policy, promotion=promotion,
                           retention=retention, registry=registry)
    return result
