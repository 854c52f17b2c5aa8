"""The federation's dashboard for a deployed federation, built from what its leaves publish to Prefect.

Every leaf, wherever it runs, sends a `branchkey.round.completed` (or `.resynced`) event per
round with its metrics and its best and served model. `federation_dashboard` reads those events
back from the Prefect API, never from a work dir, so any worker that reaches the API runs it,
and publishes the federation's artifacts under the keys the demo uses
(`branchkey-federation-<branch>`, `branchkey-federation-summary-<branch>`).

Invariants: an event id counts once (a leaf resends a round's event under the same id); a
leaf's report of a (run, round) is its latest event for it; a leaf that did not report the
federation's latest round, or reported only in an older run, is shown missing for it, never
with an older value; a branch is published again only when the server received an event since
its last publication (a Prefect Variable per branch remembers the newest one by its receipt, so
a late event about an earlier moment, a leaf's deferred publication, still counts), and a burst of
triggers adds one version.

Deployed, it runs from the `branchkey-dashboard` automation (`bk edge alerts`): Prefect's reactive
trigger fires on a round's first event and ignores the others for its window, so each run keeps
watching until that window after the triggering event (`window_start`, `watch_s`) and the events
the trigger ignored are published by the run they would have started; a run queued behind
another past its window reads once and ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.variables import Variable

from prefect_branchkey.flows.publishing.observability import publish_federation_artifacts

ROUND_EVENTS = ("branchkey.round.completed", "branchkey.round.resynced")
PAGE = 50
ROW_FIELDS = ("run_number", "round", "status", "aggregation_id", "primary_metric", "best_run_number", "best_round",
              "best_value", "served")


@dataclass
class BranchReports:
    """One branch's rounds as its leaves reported them: per leaf, per (run, round, status), the latest."""

    branch_id: str
    name: str
    newest: str = ""  # the newest event by its receipt at the server, then its id
    reports: dict[str, dict[tuple[int, int, str], tuple[datetime, dict[str, Any]]]] = field(default_factory=dict)

    def add(self, leaf: str, occurred: datetime, row: dict[str, Any]) -> None:
        key = (row["run_number"], row["round"], row["status"])
        known = self.reports.setdefault(leaf, {})
        if key not in known or known[key][0] <= occurred:
            known[key] = (occurred, row)

    def histories(self, leaves: Iterable[str] = ()) -> dict[str, list[dict[str, Any]]]:
        """Per leaf (every reporting one, and `leaves` even if silent), its rows by run and round."""
        names = sorted(set(self.reports) | set(leaves))
        return {leaf: [row for _, row in sorted(self.reports.get(leaf, {}).values(),
                                                key=lambda item: (item[1]["run_number"], item[1]["round"]))]
                for leaf in names}


def round_event_filter(branch_id: str | None, since: datetime) -> EventFilter:
    """The leaves' round events since `since`, of one branch or of every BranchKey leaf."""
    labels: dict[str, Any] = {"prefect.resource.id": ["branchkey.leaf.*"]}
    if branch_id:
        labels["branchkey.branch-id"] = [branch_id]
    return EventFilter(occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(minutes=5)),
                       event=EventNameFilter(name=list(ROUND_EVENTS)), resource=EventResourceFilter(labels=labels))


def read_round_events(branch_id: str | None, since: datetime) -> Iterator[ReceivedEvent]:
    """Every matching event the Prefect API holds, page by page."""
    with get_client(sync_client=True) as client:
        page = client.read_events(round_event_filter(branch_id, since), limit=PAGE)
        yield from page.events
        while page.next_page:
            page = client.read_events_page(str(page.next_page))
            yield from page.events


def branch_name(event: ReceivedEvent) -> str | None:
    """The branch's name from the event's payload, else from its `branch:<name>` tag."""
    name = event.payload.get("branch_name")
    if isinstance(name, str) and name:
        return name
    tags = [r.id.removeprefix("prefect.tag.branch:") for r in event.related if r.id.startswith("prefect.tag.branch:")]
    return tags[0] if tags else None


def report_row(event: ReceivedEvent) -> dict[str, Any] | None:
    """The history row a round event stands for; None for an event without a round."""
    payload = event.payload
    if not isinstance(payload.get("run_number"), int) or not isinstance(payload.get("round"), int):
        return None
    row = {name: payload.get(name) for name in ROW_FIELDS}
    row["status"] = row["status"] or event.event.rsplit(".", 1)[-1]
    row["eval_metrics"] = dict(payload.get("eval_metrics") or {})
    row["train_metrics"] = dict(payload.get("train_metrics") or {})
    return row


def collect_reports(events: Iterable[ReceivedEvent]) -> dict[str, BranchReports]:
    """Per branch id, its leaves' reports; each event id counted once."""
    branches: dict[str, BranchReports] = {}
    seen: set[str] = set()
    for event in events:
        branch_id = event.resource.get("branchkey.branch-id")
        row = report_row(event)
        if str(event.id) in seen or not branch_id or row is None:
            continue
        seen.add(str(event.id))
        branch = branches.setdefault(branch_id, BranchReports(branch_id, branch_name(event) or branch_id))
        branch.add(event.resource.name or event.resource.id, event.occurred, row)
        stamp = f"{event.received.isoformat()} {event.id}"
        branch.newest = max(branch.newest, stamp)
    return branches


def _variable_name(branch_id: str) -> str:
    return f"branchkey-dashboard-{branch_id}".lower()


def publish_new_reports(branch_id: str | None, leaves: Sequence[str], days: float) -> dict[str, int]:
    """Publish each branch whose leaves reported something since its last publication; per branch
    published, how many rounds it shows."""
    logger = get_run_logger()
    since = datetime.now(UTC) - timedelta(days=days)
    published: dict[str, int] = {}
    for branch in collect_reports(read_round_events(branch_id, since)).values():
        variable = _variable_name(branch.branch_id)
        if Variable.get(variable, default=None) == branch.newest:
            logger.debug("federation %s: nothing new since its last publication", branch.name)
            continue
        histories = branch.histories(leaves if branch_id else ())
        publish_federation_artifacts(branch.name, histories)
        Variable.set(variable, branch.newest, overwrite=True)
        published[branch.name] = len({(r["run_number"], r["round"]) for rows in histories.values() for r in rows})
        logger.info("federation %s: published %d rounds of %d leaves", branch.name, published[branch.name],
                    len(histories))
    return published


def watch_deadline(watch_s: float, settle_s: float, window_start: str | None) -> datetime:
    """Until when a run keeps watching: `watch_s` after the triggering event occurred (`window_start`,
    ISO 8601), plus `settle_s` for its reports to land; without one, `watch_s` from now. A run
    queued past its window reads once and ends, so queued runs drain; and never later than
    `watch_s` + `settle_s` from now, since the event's time is the leaf's clock, which may run ahead."""
    if not (math.isfinite(watch_s) and watch_s >= 0):
        raise ValueError(f"watch_s must be a number of seconds >= 0, got {watch_s}")
    if window_start is None:
        return datetime.now(UTC) + timedelta(seconds=watch_s)
    try:
        start = datetime.fromisoformat(window_start)
    except ValueError:
        raise ValueError(f"window_start must be an ISO 8601 time, got {window_start!r}") from None
    if start.tzinfo is None:
        raise ValueError(f"window_start must name its time zone, got {window_start!r}")
    window = timedelta(seconds=watch_s + settle_s)
    return min(start + window, datetime.now(UTC) + window)


@flow(name="federation-dashboard", log_prints=False, retries=2, retry_delay_seconds=10)
def federation_dashboard(branch_id: str | None = None, leaves: Sequence[str] = (), days: float = 90.0,
                         settle_s: float = 5.0, watch_s: float = 0.0, poll_s: float = 10.0,
                         window_start: str | None = None) -> dict[str, int]:
    """Publish each branch's federation artifacts from its leaves' round events of the last `days`.

    `branch_id` limits it to one federation; `leaves` names leaves to show even before they first
    report. It waits `settle_s` first, so the events of a round's other leaves (which end
    together) land in the same version, then keeps watching until `watch_s` after `window_start`
    (the triggering event's time; now without one), reading again every `poll_s`: the dashboard
    automation fires at most once per window and passes the window here, so a report that arrives
    inside it is published by this run. Retried on an API error, as every read starts afresh.
    Returns, per branch published, how many rounds it shows.
    """
    if not (math.isfinite(poll_s) and poll_s > 0):
        raise ValueError(f"poll_s must be a positive number of seconds, got {poll_s}")
    deadline = watch_deadline(watch_s, settle_s, window_start)
    time.sleep(settle_s)
    published = publish_new_reports(branch_id, leaves, days)
    while (left := (deadline - datetime.now(UTC)).total_seconds()) > 0:
        time.sleep(min(poll_s, left))
        published |= publish_new_reports(branch_id, leaves, days)
    if not published:
        get_run_logger().info("nothing new to publish: every branch's dashboard is current")
    return published
