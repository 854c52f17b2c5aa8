"""`branchkey-alert`: what the federation's automations run when a leaf misses its round, fails
one, or its metric drops: a markdown artifact per leaf saying what happened, when and what
to check, and the same text through a notification Block when one is named.

The automations (`deployments/automations.py`) fill the parameters from the triggering event
with Prefect's templates; a person may run the deployment by hand with the same parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.utilities.asyncutils import run_coro_as_sync

from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.flows.publishing.observability import artifact_key

AlertKind = Literal["missed-round", "failed-round", "metric-drop"]
HEADLINES: Mapping[str, str] = MappingProxyType({
    "missed-round": "has not completed a round",
    "failed-round": "failed a round",
    "metric-drop": "dropped below its best",
})
CHECKS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "missed-round": (
        "Is the leaf's machine up, and its worker running (`bk edge worker {leaf}`: `bk edge setup` names the "
        "leaf's queue after it; its runs are tagged `leaf:{leaf}`)?",
        "Are its runs Late or Scheduled in the UI (no worker polls its queue, or the queue is paused)?",
        "Is the federation's run paused or stopped on the platform?",
    ),
    "failed-round": (
        "The failed flow run's logs (the run is related to the event, and tagged `leaf:{leaf}`).",
        "The error below: a platform refusal, an aggregation timeout or the participant's own exception.",
        "The leaf's next run resumes the round from its work dir; `bk history` shows its rows.",
    ),
    "metric-drop": (
        "The leaf's summary artifact: is the drop one round's noise or a trend?",
        "The leaf's data: a shift in what the site sees (drift), or a broken evaluation set.",
        "The other leaves: a drop everywhere points at the aggregate, one leaf at its site.",
    ),
})


class AlertNotifyError(BranchKeyError, ValueError):
    """The alert's notification Block cannot be loaded or is not a notification Block."""


def _value(value: Any) -> str:
    """A payload value as a person reads it: floats to four significant digits, nothing as `-`."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _facts(kind: str, payload: Mapping[str, Any], window_s: float | None) -> list[str]:
    """The payload's highlights for this kind of alert, as markdown list items."""
    facts = []
    if kind == "missed-round" and window_s is not None:
        facts.append(f"- No `branchkey.round.completed` within {window_s:g} s of the event above.")
    if "round" in payload:
        facts.append(f"- Round {_value(payload.get('round'))} of run {_value(payload.get('run_number'))}.")
    if kind == "metric-drop":
        facts.append(f"- `{payload.get('metric')}` is {_value(payload.get('value'))}, its best "
                     f"{_value(payload.get('best_value'))} (round {_value(payload.get('best_round'))}): "
                     f"a drop of {_value(payload.get('drop'))}.")
    if payload.get("error"):
        facts.append(f"- Error: `{payload['error']}`")
    if payload.get("eval_metrics"):
        metrics = ", ".join(f"{k} {_value(v)}" for k, v in sorted(payload["eval_metrics"].items()))
        facts.append(f"- Evaluation of the global model then: {metrics}.")
    return facts


def alert_markdown(kind: AlertKind, leaf: str, event: str, occurred: str, payload: Mapping[str, Any],
                   automation: str, raised_at: datetime, window_s: float | None = None) -> str:
    """The alert's text: what happened to which leaf, when, the event's highlights and what to check."""
    lines = [f"# {leaf} {HEADLINES[kind]}", "",
             f"Automation **{automation}**, raised {raised_at.isoformat(timespec='seconds')}.", "",
             f"- Event `{event}` at {occurred}" + (" (the leaf's last completed round)." if kind == "missed-round"
                                                   else "."),
             *_facts(kind, payload, window_s), "", "## What to check", ""]
    lines += [f"{number}. {check.format(leaf=leaf)}" for number, check in enumerate(CHECKS[kind], start=1)]
    return "\n".join(lines)


def notify(block_name: str, subject: str, body: str) -> None:
    """Send the alert through the notification Block `type/name` (any of Prefect's, e.g. `slack-webhook/ops`)."""
    try:
        block = Block.load(block_name)
    except (ValueError, KeyError) as exc:
        raise AlertNotifyError(f"cannot load notification Block {block_name!r}: {exc}") from None
    if not isinstance(block, NotificationBlock):
        raise AlertNotifyError(f"Block {block_name!r} is a {type(block).__name__}, not a notification Block")
    sent = block.notify(body=body, subject=subject)
    if inspect.isawaitable(sent):
        run_coro_as_sync(sent)


@flow(name="branchkey-alert")
def branchkey_alert(kind: AlertKind, leaf: str, event: str, occurred: str, automation: str,
                    payload: dict[str, Any] | None = None, window_s: float | None = None,
                    notify_block: str | None = None) -> str:
    """Record the alert as the leaf's alert artifact (one key per leaf, a version per alert) and,
    with `notify_block` (`type/name`), send it through that Block; returns the text."""
    text = alert_markdown(kind, leaf, event, occurred, payload or {}, automation, datetime.now(UTC),
                          window_s)
    create_markdown_artifact(markdown=text, key=artifact_key("alert", leaf),
                             description=f"BranchKey alert for {leaf}: {kind}")
    if notify_block:
        notify(notify_block, f"BranchKey: {leaf} {HEADLINES[kind]}", text)
    return text
