"""The `federated-statistics` flow: one leaf's part in a federated-analytics round.

The leaf's raw columns (its participant's `statistics()`, or a callable named by import path)
are reduced on the site to six-value bundles, uploaded into the platform's open round, and
combined with the other sites'; the leaf downloads the combined bundle and publishes a table
artifact: per column the federation's count, completeness, mean, variance, std, min and max,
with this site's own beside them. The round goes into the leaf's history as an `analytics`
row. The archive is kept per run in the work dir, so a rerun after a crash sends the same
bytes under the same idempotency key and counts once.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import State

from prefect_branchkey.bk_blocks import BranchKeyCredentials, RequestRefusedError, RunStoppedError
from prefect_branchkey.bk_blocks.analytics import NAN_OMIT, bundle_columns, read_fields, summarize
from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.flows.federation.leaves import leaf_credentials
from prefect_branchkey.flows.leaf.audit import AuditTrail, leaf_facts, received_facts, statistics_facts
from prefect_branchkey.flows.leaf.history import ANALYTICS, RoundRecord, append_record, utc_from_timestamp
from prefect_branchkey.flows.leaf.state import (
    LeafBusyError,
    cancelled_as_busy,
    hold_work_dir,
    load_state,
    resolve_work_dir,
)
from prefect_branchkey.flows.participant import ParticipantError, import_object, load_participant, parse_options
from prefect_branchkey.flows.publishing.observability import artifact_key, label_flow_run, run_tags
from prefect_branchkey.tasks import LeafSession, current_run, resolve_credentials
from prefect_branchkey.tasks.statistics import (
    download_statistics,
    statistics_key,
    upload_statistics,
    wait_for_statistics,
)
from prefect_branchkey.tasks.upload import UploadReceipt

STATISTICS_DIR = "statistics"
_STATISTICS = ("n", "completeness", "mean", "variance", "std", "min", "max")


@dataclass
class StatisticsResult:
    """A leaf's statistics round: where it counted, the combined result's id, and the table rows."""

    run_number: int
    round: int
    aggregation_id: str
    table: list[dict[str, Any]]


def load_columns(participant: str | None, participant_options: dict[str, Any] | str | None,
                 statistics: str | None) -> dict[str, np.ndarray]:
    """The site's raw columns: from `statistics` (`"package.module:function"`, called with the
    options) or else from the participant's `statistics()` hook."""
    if statistics:
        columns = _load_callable(statistics)(**parse_options(participant_options))
    elif participant:
        columns = load_participant(participant, participant_options).statistics()
    else:
        raise ParticipantError("name a participant (with a statistics() hook) or a statistics callable")
    if not isinstance(columns, Mapping) or not columns:
        raise ParticipantError("the statistics source returned no columns (a mapping of name to raw values)")
    return dict(columns)


def _load_callable(path: str) -> Callable[..., Any]:
    """The statistics callable `"package.module:function"` names."""
    function = import_object(path, "statistics callable", "package.module:function")
    if not callable(function):
        raise ParticipantError(f"{path!r} is not callable")
    return function


def statistics_table(combined: Mapping[str, np.ndarray], own: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per column, the federation's statistics and this site's own beside them (`site ...`)."""
    rows = []
    mine = bundle_columns(list(own))
    for column in bundle_columns(list(combined)):
        federation = summarize(combined, column)
        site = summarize(own, column) if column in mine else None
        row: dict[str, Any] = {"column": column}
        row |= {name: _cell(getattr(federation, name)) for name in _STATISTICS}
        row |= {f"site {name}": _cell(getattr(site, name)) if site else None for name in _STATISTICS}
        rows.append(row)
    return rows


def _cell(value: float | int) -> float | int | None:
    return None if isinstance(value, float) and math.isnan(value) else value


@flow(name="federated-statistics")
def federated_statistics(
    credentials: BranchKeyCredentials | str,
    work_dir: str,
    participant: str | None = None,
    participant_options: dict[str, Any] | None = None,
    statistics: str | None = None,
    nan_policy: str = NAN_OMIT,
    timeout_s: float = 600,
    run_timeout_s: float = 3600,
) -> StatisticsResult | State:
    """Reduce this site's columns, upload them, wait for the federation's combined bundle, publish
    the table artifact and record an `analytics` history row. Ends Cancelled if a round of the
    leaf holds its work dir.

    The columns come from `statistics` (`"package.module:function"`, called with
    `participant_options`) or else from `participant`'s `statistics()` hook. `nan_policy` is
    `omit` (NaN left out and counted in `<col>_nan`) or `raise`.
    """
    logger = get_run_logger()
    block = resolve_credentials(credentials)
    directory = resolve_work_dir(work_dir)
    columns = load_columns(participant, participant_options, statistics)
    label_flow_run(f"{block.leaf_name}-statistics", run_tags(block))
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_work_dir(directory))
        except LeafBusyError as exc:
            return cancelled_as_busy(exc)
        session = stack.enter_context(LeafSession(block))
        stack.enter_context(tags(*run_tags(block, session.branch_name)))
        started = time.time()
        details = current_run(session, 0, 10.0, run_timeout_s)
        if details.run_status == "stop":
            raise RunStoppedError("the branch's run is stopped: start a run for the statistics round")
        archive = directory / STATISTICS_DIR / f"run-{details.run_number:04d}.npz"
        if not archive.exists():
            archive.parent.mkdir(parents=True, exist_ok=True)
            session.client.write_statistics(archive, columns, nan_policy)
        own = read_fields(archive)
        receipt = _upload_audited(session, directory, archive, details.run_number)
        uploaded = time.time()
        run_number, round_number = receipt.counted_in or (details.run_number, details.round or 0)
        aggregation_id = receipt.aggregation_id or wait_for_statistics(session, details.run_number, 0,
                                                                      receipt.counted_in, timeout_s)
        waited = time.time()
        path = download_statistics(session, aggregation_id, directory / STATISTICS_DIR)
        trail = AuditTrail(directory, load_state(directory, block.leaf_id).audit_head)
        head = trail.received("download", aggregation_id, leaf_facts(session, run_number, round_number)
                              | {"aggregation_id": aggregation_id, "what": "statistics"} | received_facts(path))
        table = statistics_table(read_fields(path, combined=True), own)
        create_table_artifact(table=table, key=artifact_key("statistics", block.leaf_name),
                              description=f"BranchKey federated statistics of run {run_number} round "
                                          f"{round_number}: the federation's and {block.leaf_name}'s own, per column")
        finished = time.time()
        append_record(directory, RoundRecord(
            branch_id=block.branch_id, leaf_id=block.leaf_id, leaf_name=block.leaf_name, run_number=run_number,
            round=round_number, status="completed", file_id=receipt.file_id, aggregation_id=aggregation_id,
            train_metrics=_metrics(table, "site "), eval_metrics=_metrics(table, ""), upload_s=uploaded - started,
            wait_s=waited - uploaded, download_s=finished - waited, round_s=finished - started,
            bytes_up=receipt.size, bytes_down=path.stat().st_size, started_at=utc_from_timestamp(started),
            finished_at=utc_from_timestamp(finished), flow_run_id=flow_run.get_id(), round_kind=ANALYTICS,
            payloads_sent=1, audit_head=head))
    logger.info("statistics of run %d round %d combined as %s: %d column(s)", run_number, round_number,
                aggregation_id, len(table))
    return StatisticsResult(run_number, round_number, aggregation_id, table)


def _upload_audited(session: LeafSession, work_dir: Path, archive: Path, run_number: int) -> UploadReceipt:
    """Upload the site's statistics, recorded in the audit trail before they leave and confirmed
    (or refused) after."""
    sha256 = sha256_file(archive).hex()
    key = statistics_key(session.credentials.leaf_id, run_number, 0, sha256)
    trail = AuditTrail(work_dir, load_state(work_dir, session.credentials.leaf_id).audit_head)
    trail.sending("statistics", key, leaf_facts(session, run_number, 0) | statistics_facts(archive, sha256))
    try:
        receipt = upload_statistics(session, archive, run_number, 0, sha256=sha256)
    except RequestRefusedError as exc:
        trail.refused("statistics", key, exc)
        raise
    trail.confirmed("statistics", key, {"file_id": receipt.file_id, "counted_in": receipt.counted_in})
    return receipt


def _metrics(table: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """The history row's metrics: `<column>.<statistic>` for the federation's or (`site `) the site's."""
    return {f"{row['column']}.{name}": float(row[prefix + name]) for row in table for name in _STATISTICS
            if row.get(prefix + name) is not None}


@flow(name="federation-statistics")
def federation_statistics(
    host: str,
    credentials_dir: str,
    work_root: str,
    participant: str = "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
    participant_options: dict[str, Any] | None = None,
    statistics: str | None = None,
    transport: str = "websocket",
    amqp_host: str | None = None,
    timeout_s: float = 600,
) -> dict[str, StatisticsResult]:
    """Every leaf of `credentials_dir` runs its `federated-statistics` at once (a whole federation's
    statistics round on one machine); leaf i gets `leaf_index=i, leaves=N` added to the options."""
    blocks = leaf_credentials(Path(credentials_dir), host, transport, amqp_host)

    def one(index: int, block: BranchKeyCredentials) -> StatisticsResult:
        options = {**(participant_options or {}), "leaf_index": index, "leaves": len(blocks)}
        result = federated_statistics(block, str(Path(work_root) / block.leaf_name), participant, options, statistics,
                                      timeout_s=timeout_s)
        if not isinstance(result, StatisticsResult):
            raise LeafBusyError(f"{block.leaf_name}: another run holds its work dir, so its statistics round did "
                                "not run")
        return result

    with ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="leaf") as pool:
        futures = {b.leaf_name: pool.submit(contextvars.copy_context().run, one, i, b) for i, b in enumerate(blocks)}
        return {name: future.result() for name, future in futures.items()}
