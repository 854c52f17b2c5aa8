"""When a round closes and how its aggregation runs: the closing rule, and one worker thread that
runs FedAvg for closed rounds in order, retrying what a retry can fix."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect_branchkey.bk_blocks.errors import ArchiveError
from prefect_branchkey.bk_server.analytics import combine
from prefect_branchkey.bk_server.faults import crash_point
from prefect_branchkey.bk_server.fedavg import AggregationError, WeightedUpdate, fedavg
from prefect_branchkey.bk_server.store import Branch

log = logging.getLogger(__name__)

AGGREGATION_ATTEMPTS = 3


def round_is_due(branch: Branch, leaves_in: int, now: float) -> str | None:
    """Why the branch's open round closes now: `full` (min_updates leaves are in) or `deadline`
    (its deadline passed with a quorum in); None while it stays open."""
    if branch.run_status == "stop" or branch.round == 0:
        return None
    if leaves_in >= branch.min_updates:
        return "full"
    if (branch.round_deadline_s is not None and now - branch.round_opened_at >= branch.round_deadline_s
            and leaves_in >= (branch.quorum or 1)):
        return "deadline"
    return None


def write_aggregate(inputs: list[WeightedUpdate], out: Path, what: str) -> None:
    """FedAvg of `inputs` into `out` (written atomically); an I/O error is retried
    (AGGREGATION_ATTEMPTS in all), a bad input is not. Whether `out` exists afterwards says
    whether the round has its aggregate (one written before a restart counts too)."""
    _with_io_retries(lambda: fedavg(inputs, out, on_layer=lambda _: crash_point("fedavg-layer-written")),
                     f"aggregation of {what}", (AggregationError, ArchiveError))


def write_combined(inputs: list[Path], schema: dict[str, dict[str, Any]], out: Path, what: str) -> None:
    """The statistics payloads of a round combined field by field into `out`, retried like
    `write_aggregate`: an I/O error again, a bad input never."""
    _with_io_retries(lambda: combine(inputs, schema, out), f"combining {what}", (ArchiveError, ValueError))


def _with_io_retries(write: Callable[[], object], what: str, bad_input: tuple[type[Exception], ...]) -> None:
    """Run `write`, again after an I/O error (AGGREGATION_ATTEMPTS in all, a growing pause between),
    never after `bad_input` (logged: the round stays without its result)."""
    for attempt in range(1, AGGREGATION_ATTEMPTS + 1):
        try:
            write()
            return
        except OSError as exc:
            log.warning("%s hit %s (attempt %d of %d)", what, exc, attempt, AGGREGATION_ATTEMPTS)
            time.sleep(attempt)
        except bad_input:
            log.exception("%s failed", what)
            return
    log.error("%s failed %d times", what, AGGREGATION_ATTEMPTS)


class AggregationQueue:
    """Closed rounds waiting for FedAvg, aggregated one at a time on a thread of their own, so an
    aggregation never holds up the requests that keep arriving."""

    def __init__(self, aggregate: Callable[[str, int, int], None]) -> None:
        self._aggregate = aggregate
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedavg")

    def submit(self, branch_id: str, run_number: int, round_number: int) -> None:
        self._executor.submit(self._aggregate, branch_id, run_number, round_number)

    def close(self) -> None:
        """Finish the aggregations already queued, then stop."""
        self._executor.shutdown(wait=True, cancel_futures=False)
