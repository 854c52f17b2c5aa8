"""The alert automations built from `bk edge alerts`'s options, their refusals, and the alert's text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import Posture

from prefect_branchkey.deployments.automations import (
    AlertOptions,
    AlertTargets,
    alert_automations,
    check_window,
    parse_block_name,
    watched_metric,
)
from prefect_branchkey.deployments.edge import EdgeSetupError
from prefect_branchkey.flows.alerts import alert_markdown

DIGITS = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
TARGETS = AlertTargets(uuid4())
RAISED = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _by_name(options: AlertOptions, targets: AlertTargets = TARGETS) -> dict[str, object]:
    return {automation.name: automation for automation in alert_automations(options, targets)}


def test_missed_round_is_a_proactive_per_leaf_heartbeat_on_completed_rounds() -> None:
    trigger = _by_name(AlertOptions(30))["branchkey-missed-round"].trigger
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(seconds=30)
    assert trigger.after == trigger.expect == {"branchkey.round.completed"}
    assert trigger.for_each == {"prefect.resource.id"} and trigger.threshold == 1


def test_failed_round_reacts_to_each_failed_round_event() -> None:
    trigger = _by_name(AlertOptions(30))["branchkey-failed-round"].trigger
    assert trigger.posture == Posture.Reactive and trigger.expect == {"branchkey.round.failed"}


def test_metric_drop_matches_the_metric_label_of_the_drop_event() -> None:
    trigger = _by_name(AlertOptions(30, participant=DIGITS, metric="loss"))["branchkey-metric-drop"].trigger
    assert trigger.expect == {"branchkey.metric.dropped"}
    assert trigger.match.model_dump()["branchkey.metric"] == "loss"


def test_metric_drop_watches_the_participants_primary_metric_by_default() -> None:
    assert watched_metric(AlertOptions(30, participant=DIGITS)) == "accuracy"


def test_without_a_participant_there_is_no_metric_drop_automation() -> None:
    assert set(_by_name(AlertOptions(30))) == {"branchkey-missed-round", "branchkey-failed-round"}


def test_every_automation_watches_only_leaves() -> None:
    for automation in alert_automations(AlertOptions(30, participant=DIGITS), TARGETS):
        assert automation.trigger.match.model_dump()["prefect.resource.id"] == "branchkey.leaf.*"


def test_a_branch_scopes_the_automations_match_and_names() -> None:
    automations = _by_name(AlertOptions(30, branch_id="b-1"))
    assert set(automations) == {"branchkey-missed-round-b-1", "branchkey-failed-round-b-1"}
    for automation in automations.values():
        assert automation.trigger.match.model_dump()["branchkey.branch-id"] == "b-1"


def test_each_automation_runs_the_alert_deployment_with_templated_parameters() -> None:
    for automation in alert_automations(AlertOptions(30, participant=DIGITS), TARGETS):
        (action,) = automation.actions
        assert isinstance(action, RunDeployment) and action.deployment_id == TARGETS.alert_deployment_id
        assert action.parameters["leaf"] == "{{ event.resource.name }}"
        assert action.parameters["payload"] == "{{ event.payload }}"
        assert action.parameters["automation"] == "{{ automation.name }}"


def test_a_notification_block_adds_a_notification_to_every_automation() -> None:
    targets = AlertTargets(uuid4(), uuid4())
    for automation in alert_automations(AlertOptions(30, participant=DIGITS), targets):
        notification = automation.actions[1]
        assert isinstance(notification, SendNotification) and notification.block_document_id == targets.notify_block_id
        assert "{{ event.resource.name }}" in notification.subject


@pytest.mark.parametrize("seconds", [0, -5, float("nan"), float("inf")])
def test_a_window_that_is_not_positive_is_refused(seconds: float) -> None:
    with pytest.raises(EdgeSetupError, match="positive"):
        check_window(seconds)


def test_a_window_below_prefects_proactive_minimum_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="minimum of 10 s"):
        check_window(5)


def test_a_metric_the_participant_does_not_declare_is_refused_naming_the_declared_ones() -> None:
    with pytest.raises(EdgeSetupError, match=r"metric 'f1' is not one the participant declares \(accuracy, loss\)"):
        watched_metric(AlertOptions(30, participant=DIGITS, metric="f1"))


def test_a_participant_declaring_no_metrics_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="declares no metrics"):
        watched_metric(AlertOptions(30, participant="tests.support.alerting:Undeclared"))


def test_a_participant_that_cannot_be_imported_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="cannot import participant"):
        watched_metric(AlertOptions(30, participant="tests.support.alerting:Missing"))


def test_a_metric_without_a_participant_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="needs --participant"):
        watched_metric(AlertOptions(30, metric="accuracy"))


def test_a_notification_block_name_without_its_type_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="block-type/block-name"):
        parse_block_name("ops")


def test_a_missed_round_alert_names_the_window_the_last_round_and_what_to_check() -> None:
    text = alert_markdown("missed-round", "digits-leaf-1", "branchkey.round.completed", "2026-11-30 11:59:00+00:00",
                          {"round": 4, "run_number": 1}, "branchkey-missed-round", RAISED, window_s=30)
    assert text.startswith("# digits-leaf-1 has not completed a round")
    assert "within 30 s" in text and "Round 4 of run 1" in text and "`bk edge worker digits-leaf-1`" in text
    assert text.index("- Event `branchkey.round.completed`") < text.index("within 30 s of the event above")


def test_a_failed_round_alert_quotes_the_error() -> None:
    text = alert_markdown("failed-round", "digits-leaf-1", "branchkey.round.failed", "now",
                          {"round": 2, "run_number": 1, "error": "RuntimeError: boom"}, "branchkey-failed-round",
                          RAISED)
    assert "`RuntimeError: boom`" in text


def test_a_metric_drop_alert_states_the_value_its_best_and_the_drop() -> None:
    text = alert_markdown("metric-drop", "digits-leaf-1", "branchkey.metric.dropped", "now",
                          {"metric": "accuracy", "value": 0.71, "best_value": 0.93, "best_round": 3, "drop": 0.22,
                           "round": 5, "run_number": 1}, "branchkey-metric-drop", RAISED)
    assert "`accuracy` is 0.71, its best 0.93 (round 3): a drop of 0.22" in text


def test_the_dashboard_automation_fires_once_per_window_and_the_run_watches_that_window() -> None:
    dashboard = uuid4()
    automation = _by_name(AlertOptions(30, branch_id="b-1", dashboard_every_s=20),
                          AlertTargets(uuid4(), dashboard_deployment_id=dashboard))["branchkey-dashboard-b-1"]
    trigger = automation.trigger
    assert trigger.posture == Posture.Reactive and trigger.threshold == 1
    assert trigger.within == timedelta(seconds=20) and not trigger.for_each
    assert trigger.expect == {"branchkey.round.completed", "branchkey.round.resynced"}
    assert trigger.match.model_dump()["branchkey.branch-id"] == "b-1"
    (action,) = automation.actions
    assert isinstance(action, RunDeployment) and action.deployment_id == dashboard
    assert action.parameters == {"branch_id": "b-1", "watch_s": 20, "window_start": "{{ event.occurred | string }}"}


def test_a_dashboard_window_below_five_seconds_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="--dashboard-every must be at least 5 s, got 1"):
        _by_name(AlertOptions(30, dashboard_every_s=1), AlertTargets(uuid4(), dashboard_deployment_id=uuid4()))
