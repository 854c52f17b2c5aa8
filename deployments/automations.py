"""The federation's automations: a leaf that missed its round, a failed round, a metric drop,
and the federation dashboard's rebuild after rounds.

One set per federation (a branch id), or for every BranchKey leaf on the server when no
branch is named. Each alert automation watches all the federation's leaves separately
(`for_each` on the leaf's resource id), so a leaf added later is watched without setting
anything up again, and the UI lists one automation per kind, not one per leaf; each runs the
`branchkey-alert` deployment with parameters templated from the triggering event, and sends a
notification through a Block when one is named. The dashboard's watches the leaves together
and runs `ops-dashboard` at most once per window. Created by name and updated in place:
idempotent.

The missed-round trigger is Prefect's heartbeat pattern: proactive, `after` and `expect` both
`branchkey.round.completed`, so every completed round starts the leaf's window afresh and the
automation fires once, WINDOW seconds after the leaf's last completed round, then waits for
its next one. A leaf is watched from its first completed round on.

`bk edge setup --lost-run-after` adds one more, of Prefect's own pattern for zombie runs: a
BranchKey flow run (tagged `branchkey`, as every deployment of prefect.yaml and `bk edge serve`
is) that sent a heartbeat and then neither another one nor a final state within the window is
set Crashed, so a run whose machine or worker died never stays Running. Its heartbeats come
from `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`, which `bk edge worker` sets (30 s, Prefect's shortest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from prefect_branchkey.deployments.edge import EdgeSetupError, require_api_url
from prefect_branchkey.flows.leaf.promotion import metric_goal
from prefect_branchkey.flows.participant import ParticipantError, participant_class

ALERT_DEPLOYMENT = "branchkey-alert/ops-alerts"
DASHBOARD_DEPLOYMENT = "federation-dashboard/ops-dashboard"
COMPLETED, FAILED, DROPPED = "branchkey.round.completed", "branchkey.round.failed", "branchkey.metric.dropped"
RESYNCED = "branchkey.round.resynced"
# The dashboard is rebuilt at most once per window (60 s by default), never more often than every 5 s.
DEFAULT_DASHBOARD_EVERY_S, MIN_DASHBOARD_EVERY_S = 60.0, 5.0
# Prefect refuses a proactive trigger's window below 10 s.
MIN_WINDOW_S = 10.0
LEAF = "{{ event.resource.name }}"
LOST_RUN_AUTOMATION = "branchkey-lost-run"
HEARTBEAT = "prefect.flow-run.heartbeat"
RUN_ENDED = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
# Two heartbeats (30 s apart at the shortest) may never be missed by a healthy run: the window is
# at least that; pick it longer than the network outages an edge machine may have (300 s).
MIN_LOST_RUN_S = 60.0
SUBJECTS = {
    "missed-round": "BranchKey: " + LEAF + " has not completed a round",
    "failed-round": "BranchKey: " + LEAF + " failed a round",
    "metric-drop": "BranchKey: " + LEAF + "'s {{ event.payload.metric }} dropped below its best",
}
BODIES = {
    "missed-round": ("Leaf " + LEAF + " completed no round within {window} s of its last one (round "
                     "{{ event.payload.round }} at {{ event.occurred }}). Check its machine and worker. "
                     "Automation: {{ automation.name }}."),
    "failed-round": ("Leaf " + LEAF + " failed round {{ event.payload.round }} at {{ event.occurred }}: "
                     "{{ event.payload.error }}. Automation: {{ automation.name }}."),
    "metric-drop": ("Leaf " + LEAF + "'s {{ event.payload.metric }} is {{ event.payload.value | round(4) }} in round "
                    "{{ event.payload.round }}, down {{ event.payload.drop | round(4) }} from its best "
                    "{{ event.payload.best_value | round(4) }} (round {{ event.payload.best_round }}). "
                    "Automation: {{ automation.name }}."),
}


@dataclass(frozen=True)
class AlertOptions:
    """What to watch and whom to tell: the window, the federation, the metric, the notification Block."""

    missed_round_after_s: float
    branch_id: str | None = None
    participant: str | None = None
    metric: str | None = None
    notify_block: str | None = None
    alert_deployment: str = ALERT_DEPLOYMENT
    dashboard_every_s: float = DEFAULT_DASHBOARD_EVERY_S
    dashboard_deployment: str = DASHBOARD_DEPLOYMENT


@dataclass(frozen=True)
class AlertTargets:
    """The server objects the automations act through: the alert and dashboard deployments and the
    notification Block."""

    alert_deployment_id: UUID
    notify_block_id: UUID | None = None
    dashboard_deployment_id: UUID | None = None


def check_window(seconds: float) -> timedelta:
    """The missed-round window, refused unless at least Prefect's minimum for a proactive trigger."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise EdgeSetupError(f"--missed-round-after must be a positive number of seconds, got {seconds:g}")
    if seconds < MIN_WINDOW_S:
        raise EdgeSetupError(f"--missed-round-after {seconds:g} s is below Prefect's minimum of {MIN_WINDOW_S:g} s "
                             f"for a proactive trigger")
    return timedelta(seconds=seconds)


def watched_metric(options: AlertOptions) -> str | None:
    """The metric the drop automation matches: the one named, else the participant's primary one
    (the rule the round flow judges its models by); None without a participant (no drop
    automation). Refused if the participant cannot be imported, declares no metrics or not this one."""
    if options.participant is None:
        if options.metric is not None:
            raise EdgeSetupError(f"--metric {options.metric} needs --participant, the class that declares it")
        return None
    try:
        cls = participant_class(options.participant)
        if not cls.metrics:
            raise EdgeSetupError(f"participant {options.participant} declares no metrics: give its class "
                                 f"`metrics = {{\"accuracy\": \"max\", ...}}` to watch one for drops")
        return metric_goal(cls, options.metric).name
    except ParticipantError as exc:
        raise EdgeSetupError(str(exc)) from None


def check_dashboard_every(seconds: float) -> timedelta:
    """The dashboard automation's window, refused below MIN_DASHBOARD_EVERY_S."""
    if not (math.isfinite(seconds) and seconds >= MIN_DASHBOARD_EVERY_S):
        raise EdgeSetupError(f"--dashboard-every must be at least {MIN_DASHBOARD_EVERY_S:g} s, got {seconds:g}")
    return timedelta(seconds=seconds)


def parse_block_name(text: str) -> tuple[str, str]:
    """`type/name` of a Block (`slack-webhook/ops`) as (type slug, name)."""
    slug, sep, name = text.partition("/")
    if not sep or not slug or not name:
        raise EdgeSetupError(f"--notify-block must be 'block-type/block-name' (e.g. slack-webhook/ops), got {text!r}")
    return slug, name


def automation_name(kind: str, options: AlertOptions) -> str:
    """The automation's stable name, by kind and federation: what makes its creation idempotent."""
    return f"branchkey-{kind}" + (f"-{options.branch_id}" if options.branch_id else "")


def leaf_match(options: AlertOptions, **labels: str) -> dict[str, str]:
    """The resource filter: the federation's leaves (every BranchKey leaf without a branch), plus `labels`."""
    match = {"prefect.resource.id": "branchkey.leaf.*", **labels}
    if options.branch_id:
        match["branchkey.branch-id"] = options.branch_id
    return match


def alert_parameters(kind: str, options: AlertOptions) -> dict[str, Any]:
    """The alert flow's parameters, templated from the triggering event and the automation."""
    parameters: dict[str, Any] = {
        "kind": kind, "leaf": LEAF, "event": "{{ event.event }}", "occurred": "{{ event.occurred | string }}",
        "payload": "{{ event.payload }}", "automation": "{{ automation.name }}",
    }
    if kind == "missed-round":
        parameters["window_s"] = options.missed_round_after_s
    return parameters


def alert_actions(kind: str, options: AlertOptions, targets: AlertTargets) -> list[Any]:
    """Run the alert deployment; with a notification Block, also send the alert's short text through it."""
    actions: list[Any] = [RunDeployment(source="selected", deployment_id=targets.alert_deployment_id,
                                        parameters=alert_parameters(kind, options))]
    if targets.notify_block_id is not None:
        body = BODIES[kind].replace("{window}", f"{options.missed_round_after_s:g}")
        actions.append(SendNotification(block_document_id=targets.notify_block_id, subject=SUBJECTS[kind],
                                        body=body))
    return actions


def alert_triggers(options: AlertOptions, metric: str | None) -> dict[str, EventTrigger]:
    """Per kind, the trigger: the proactive missed round, the reactive failed round and metric drop."""
    triggers = {
        "missed-round": EventTrigger(
            match=leaf_match(options), after={COMPLETED}, expect={COMPLETED}, for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=check_window(options.missed_round_after_s)),
        "failed-round": EventTrigger(match=leaf_match(options), expect={FAILED}, for_each={"prefect.resource.id"},
                                     posture=Posture.Reactive, threshold=1),
    }
    if metric is not None:
        triggers["metric-drop"] = EventTrigger(
            match=leaf_match(options, **{"branchkey.metric": metric}), expect={DROPPED},
            for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1)
    return triggers


DESCRIPTIONS = {
    "missed-round": "A leaf completed no round within {window} s of its last completed one",
    "failed-round": "A leaf's round failed (branchkey.round.failed)",
    "metric-drop": "A leaf's {metric} fell more than the flow's promotion.metric_drop_alert below its best",
}


def _scope(options: AlertOptions) -> str:
    """What the automations watch, for their descriptions."""
    return f" (branch {options.branch_id})" if options.branch_id else " (every BranchKey leaf)"


def dashboard_automation(options: AlertOptions, deployment_id: UUID) -> AutomationCore:
    """Rebuild the federation's dashboard after its leaves' rounds: fire on a round's first event,
    at most once per window, and have the run watch for the window, so the events the trigger
    ignores meanwhile (the round's other leaves) are published by it (pure)."""
    every = check_dashboard_every(options.dashboard_every_s)
    trigger = EventTrigger(match=leaf_match(options), expect={COMPLETED, RESYNCED}, posture=Posture.Reactive,
                           threshold=1, within=every)
    parameters = {"branch_id": options.branch_id, "watch_s": options.dashboard_every_s,
                  "window_start": "{{ event.occurred | string }}"}
    return AutomationCore(name=automation_name("dashboard", options), enabled=True, trigger=trigger,
                          description=(f"Rebuild the federation dashboard after rounds, at most once per "
                                       f"{options.dashboard_every_s:g} s{_scope(options)}"),
                          actions=[RunDeployment(source="selected", deployment_id=deployment_id,
                                                 parameters=parameters)])


def alert_automations(options: AlertOptions, targets: AlertTargets) -> list[AutomationCore]:
    """The federation's automations for these options, the dashboard's last when its deployment is
    known (pure: nothing is read from or sent to the server)."""
    metric = watched_metric(options)
    scope = _scope(options)
    automations = []
    for kind, trigger in alert_triggers(options, metric).items():
        description = DESCRIPTIONS[kind].format(window=f"{options.missed_round_after_s:g}", metric=metric)
        automations.append(AutomationCore(name=automation_name(kind, options), description=description + scope,
                                          enabled=True, trigger=trigger,
                                          actions=alert_actions(kind, options, targets)))
    if targets.dashboard_deployment_id is not None:
        automations.append(dashboard_automation(options, targets.dashboard_deployment_id))
    return automations


def _deployment_id(client: SyncPrefectClient, deployment: str) -> UUID:
    """A deployment's id by `flow/deployment`, refused with the command that deploys it."""
    try:
        return client.read_deployment_by_name(deployment).id
    except ObjectNotFound:
        name = deployment.partition("/")[2]
        raise EdgeSetupError(f"the deployment {deployment} is not deployed: run `prefect deploy --name {name}` "
                             f"(or `--all`) first") from None


def find_alert_targets(options: AlertOptions) -> AlertTargets:
    """The alert and dashboard deployments' ids and the notification Block's, refused if one is
    missing on the server."""
    with get_client(sync_client=True) as client:
        alert_id = _deployment_id(client, options.alert_deployment)
        dashboard_id = _deployment_id(client, options.dashboard_deployment)
        block_id = None
        if options.notify_block:
            slug, name = parse_block_name(options.notify_block)
            try:
                document = client.read_block_document_by_name(name, block_type_slug=slug)
            except ObjectNotFound:
                raise EdgeSetupError(f"notification Block {options.notify_block} does not exist: create it first "
                                     f"(UI: Blocks, or `prefect block create {slug}`)") from None
            if "notify" not in (document.block_schema.capabilities if document.block_schema else []):
                raise EdgeSetupError(f"Block {options.notify_block} is not a notification Block")
            block_id = document.id
    return AlertTargets(alert_id, block_id, dashboard_id)


def ensure_automation(automation: AutomationCore) -> bool:
    """Create the automation, or update the one of its name in place; True if it was created."""
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
            return False
        client.create_automation(automation)
        return True


def set_up_alerts(options: AlertOptions) -> list[tuple[AutomationCore, bool]]:
    """Every automation for these options on the server, each with whether it was new.

    Every option is checked (and the server's deployment and Block looked up) before any
    automation is written, so a refusal changes nothing.
    """
    require_api_url()
    check_window(options.missed_round_after_s)
    check_dashboard_every(options.dashboard_every_s)
    watched_metric(options)
    automations = alert_automations(options, find_alert_targets(options))
    return [(automation, ensure_automation(automation)) for automation in automations]


def check_lost_run_window(seconds: float) -> timedelta:
    """The lost-run window, refused below two of Prefect's shortest heartbeat intervals."""
    if not (math.isfinite(seconds) and seconds >= MIN_LOST_RUN_S):
        raise EdgeSetupError(f"--lost-run-after must be at least {MIN_LOST_RUN_S:g} s (two heartbeats of 30 s), "
                             f"got {seconds:g}")
    return timedelta(seconds=seconds)


def lost_run_automation(after_s: float) -> AutomationCore:
    """Crash a BranchKey flow run that stopped sending heartbeats for `after_s` seconds without
    ending (pure: nothing is read from or sent to the server)."""
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.branchkey"},
        after={HEARTBEAT}, expect={HEARTBEAT, *RUN_ENDED}, for_each={"prefect.resource.id"},
        posture=Posture.Proactive, threshold=1, within=check_lost_run_window(after_s))
    message = (f"No heartbeat for {after_s:g} s: the run's machine or worker died, or lost the Prefect server. "
               "The leaf's next run resumes its round.")
    return AutomationCore(name=LOST_RUN_AUTOMATION, enabled=True, trigger=trigger,
                          description=f"A BranchKey flow run without a heartbeat for {after_s:g} s is set Crashed",
                          actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)])


def set_up_lost_runs(after_s: float) -> bool:
    """The lost-run automation on the server (updated in place by name); True if it was created."""
    require_api_url()
    return ensure_automation(lost_run_automation(after_s))
