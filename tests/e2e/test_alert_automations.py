"""End to end, the federation's automations as an operator sets them up: `bk edge setup`,
`prefect deploy` of a leaf's rounds and the alert deployment, `bk edge alerts` (twice), a
worker for the leaf and one for the `ops` queue, against a real Prefect server on PostgreSQL
and bk_server. The leaf fails a round (its participant's evaluation raises, after the upload),
then completes rounds on a short interval, then its worker is stopped: the failed-round and
missed-round automations each run the alert deployment, whose runs write the leaf's alert
artifact, and send a notification through a webhook Block. The round flow does not emit
`branchkey.metric.dropped` yet on this branch: the test posts two such events, of the contract's
shape, for a metric watched and one not watched, to the events API.

One scenario is run once for the module; each test checks one thing it must show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.bk_dev.processes import spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.publishing.observability import artifact_key

from ..support.bkserver import BkServer
from ..support.browser import render_text
from ..support.flow_helpers import artifacts, events
from ..support.process_helpers import assert_none_left, new_marker
from ..support.webhook import webhook_server
from .test_edge_deployment import _api, _deployments, _flow_runs, _run, _wait_until

pytestmark = [pytest.mark.e2e]

PROJECT = Path(__file__).resolve().parents[2]
WINDOW_S = 15
INTERVAL_S = 5
HEALTHY_ROUNDS = 3
HOOK = "alerts-hook"
AUTOMATIONS = {"branchkey-missed-round", "branchkey-failed-round", "branchkey-metric-drop", "branchkey-dashboard"}


@dataclass
class Alerting:
    """What the scenario left behind to check: the Prefect server, the leaf, the webhook's
    requests, the two `bk edge alerts` outputs, what `prefect deploy --name` deployed, the
    refusals, when the worker stopped."""

    prefect: LocalPrefectServer
    leaf_name: str
    work_dir: Path
    setup_outputs: list[str]
    deployed: set[str]
    refusals: dict[str, str]
    worker_stopped_at: datetime
    hooked: list[dict[str, Any]] = field(default_factory=list)


def _refusal(command: list[str], env: dict[str, str]) -> str:
    """Run a command that must refuse (exit 2); its error output."""
    result = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, f"{' '.join(command)} did not refuse:\n{result.stdout}\n{result.stderr}"
    return result.stderr


def _pause_schedules(api: str, deployment: dict[str, Any], active: bool = False,
                     interval_s: float | None = None) -> None:
    """Pause the deployment's schedules (and drop their scheduled runs), or activate them at an interval."""
    anchor = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    for schedule in deployment["schedules"]:
        body: dict[str, Any] = {"active": active}
        if interval_s is not None:
            body["schedule"] = {"interval": interval_s, "anchor_date": anchor, "timezone": "UTC"}
        _api(api, "PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", body)
    if not active:
        for run in _flow_runs(api):
            if run["state_type"] == "SCHEDULED" and run["auto_scheduled"]:
                _api(api, "DELETE", f"/flow_runs/{run['id']}")


def _drop_event(leaf: dict[str, str], branch_id: str, metric: str) -> dict[str, Any]:
    """`branchkey.metric.dropped` as the round flow emits it: the leaf, its branch and the metric as labels."""
    return {
        "id": str(uuid4()), "occurred": datetime.now(UTC).isoformat(), "event": "branchkey.metric.dropped",
        "resource": {"prefect.resource.id": f"branchkey.leaf.{leaf['id']}", "prefect.resource.name": leaf["name"],
                     "branchkey.branch-id": branch_id, "branchkey.metric": metric},
        "payload": {"metric": metric, "value": 0.5, "best_value": 0.9, "best_round": 1, "drop": 0.4,
                    "run_number": 1, "round": 2},
    }


def _alert_runs(api: str, kind: str) -> list[dict[str, Any]]:
    """The alert deployment's flow runs of this kind, oldest first."""
    alert = _deployments(api)["ops-alerts"]["id"]
    return [run for run in _flow_runs(api) if run["deployment_id"] == alert and run["parameters"]["kind"] == kind]


def _completed_alert(api: str, kind: str) -> bool:
    return any(run["state_type"] == "COMPLETED" for run in _alert_runs(api, kind))


@pytest.fixture(scope="module")
def alerting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alerting]:
    """Set the automations up, fail a round, run healthy rounds, stop the leaf's worker; tear down."""
    root = tmp_path_factory.mktemp("alerts")
    marker = new_marker()
    prefect = LocalPrefectServer(root / "prefect-home", settings={
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        # The missed-round trigger is checked each second rather than each 5 s (Prefect's default).
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_LOGGING_LEVEL": "WARNING", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        marker[0]: marker[1],
    })
    server = BkServer(root / "bk")
    received: list[dict[str, Any]] = []
    hook = webhook_server(received)
    leaf_worker: subprocess.Popen[bytes] | None = None
    ops_worker: subprocess.Popen[bytes] | None = None
    try:
        prefect.start()
        server.start()
        env = prefect.client_env()
        # The leaf's participant here is a test's (tests.support.alerting): importable from the checkout.
        worker_env = env | {"BRANCHKEY_PROJECT_DIR": str(PROJECT), "BRANCHKEY_WORK_ROOT": str(root / "leaves"),
                            "PYTHONPATH": str(PROJECT)}
        federation = server.federation(leaves=1, tree="alerts", branch="digits")
        (path,) = write_credentials(root / "creds", federation.leaves)
        _run(["bk", "edge", "setup", str(path), "--host", server.url], env)
        alerts = ["bk", "edge", "alerts", "--missed-round-after", str(WINDOW_S),
                  "--participant", "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                  "--notify-block", f"custom-webhook/{HOOK}", "--dashboard-every", "10"]
        refusals = {"undeployed": _refusal(alerts, env)}
        _run(["prefect", "--no-prompt", "deploy", "--name", "digits-leaf-1-rounds", "--name", "ops-alerts",
              "--name", "ops-dashboard"], env)
        deployed = set(_deployments(prefect.api_url))
        rounds = _deployments(prefect.api_url)["digits-leaf-1-rounds"]
        _pause_schedules(prefect.api_url, rounds)
        refusals["missing block"] = _refusal(alerts, env)
        refusals["unknown metric"] = _refusal([*alerts, "--metric", "f1"], env)
        refusals["short window"] = _refusal([*alerts[:4], "5"], env)
        with temporary_settings(updates={PREFECT_API_URL: prefect.api_url}):
            CustomWebhookNotificationBlock(name="ops", url=f"http://127.0.0.1:{hook.server_port}/hook",
                                           json_data={"text": "{{subject}}: {{body}}"}).save(HOOK)
        outputs = [_run(alerts, env), _run(alerts, env)]
        leaf_worker = spawn(["prefect", "worker", "start", "--pool", "branchkey-edge", "--work-queue", "digits-leaf-1",
                             "--name", "edge-digits-leaf-1"], root / "worker-digits-leaf-1.log", env=worker_env)
        ops_worker = spawn(["prefect", "worker", "start", "--pool", "branchkey-edge", "--work-queue", "ops",
                            "--name", "ops"], root / "worker-ops.log", env=worker_env)
        _api(prefect.api_url, "POST", f"/deployments/{rounds['id']}/create_flow_run",
             {"parameters": {"participant": "tests.support.alerting:DigitsFailingEvaluation"}})
        _wait_until(lambda: any(r["state_type"] == "FAILED" and r["deployment_id"] == rounds["id"]
                                for r in _flow_runs(prefect.api_url)), 180, "the round whose evaluation raises to fail")
        for metric in ("loss", "accuracy"):
            _api(prefect.api_url, "POST", "/events", [_drop_event(federation.leaves[0], federation.branch_id, metric)])
        _pause_schedules(prefect.api_url, rounds, active=True, interval_s=INTERVAL_S)
        first_completed = time.monotonic()
        _wait_until(lambda: _completed_alert(prefect.api_url, "metric-drop"), 120, "the metric-drop alert run")
        _wait_until(lambda: len(history_rows(root / "leaves" / "digits-leaf-1")) >= 1, 180, "the leaf's first round")
        _wait_until(lambda: len(history_rows(root / "leaves" / "digits-leaf-1")) >= HEALTHY_ROUNDS
                    and time.monotonic() - first_completed > WINDOW_S + 5, 300,
                    "healthy rounds for longer than the window")
        leaf_id = f"branchkey.leaf.{federation.leaves[0]['id']}"

        def completed_events() -> int:
            return len(events(prefect.api_url, "branchkey.round.completed", leaf_id, 1, timeout=1))

        # Stopped right after a round's event reached the server, so that the gap begins at the stop.
        seen = completed_events()
        _wait_until(lambda: completed_events() > seen, 60, "a further round's event at the server")
        stopped_at = datetime.now(UTC)
        stop_group(leaf_worker)

        def last_gap_alerted() -> bool:
            """The alert of the gap after the last round (the stop may have cut a round short, and its
            event with it); not an earlier gap's, which a loaded machine may have caused."""
            last_round = max(datetime.fromisoformat(event["occurred"]) for event in
                             events(prefect.api_url, "branchkey.round.completed", leaf_id, 1, timeout=1))
            return any(run["state_type"] == "COMPLETED" and datetime.fromisoformat(run["parameters"]["occurred"])
                       == last_round for run in _alert_runs(prefect.api_url, "missed-round"))

        _wait_until(last_gap_alerted, WINDOW_S + 90, "the missed-round alert run after the leaf's worker stopped")
        _wait_until(lambda: len(received) >= 3, 30, "the three notifications at the webhook")
        name = json.loads(Path(path).read_text())["name"]
        yield Alerting(prefect, name, root / "leaves" / "digits-leaf-1", outputs, deployed, refusals, stopped_at,
                       received)
    finally:
        for worker in (leaf_worker, ops_worker):
            if worker is not None:
                stop_group(worker)
        hook.shutdown()
        prefect.stop()
        server.stop()
        assert_none_left(marker)


def _automations(api: str) -> list[dict[str, Any]]:
    return _api(api, "POST", "/automations/filter", {})


def test_alerts_created_twice_are_one_automation_each(alerting: Alerting) -> None:
    names = [automation["name"] for automation in _automations(alerting.prefect.api_url)]
    assert sorted(names) == sorted(AUTOMATIONS)
    assert alerting.setup_outputs[0].count("created") == 4 and alerting.setup_outputs[1].count("updated") == 4


def test_prefect_deploy_by_name_deploys_only_the_named_deployments(alerting: Alerting) -> None:
    assert alerting.deployed == {"digits-leaf-1-rounds", "ops-alerts", "ops-dashboard"}


def test_alerts_before_the_alert_deployment_is_deployed_are_refused(alerting: Alerting) -> None:
    assert "branchkey-alert/ops-alerts is not deployed" in alerting.refusals["undeployed"]


def test_a_notification_block_that_does_not_exist_is_refused(alerting: Alerting) -> None:
    assert f"notification Block custom-webhook/{HOOK} does not exist" in alerting.refusals["missing block"]


def test_a_metric_the_participant_does_not_declare_is_refused(alerting: Alerting) -> None:
    assert "metric 'f1' is not one the participant declares (accuracy, loss)" in alerting.refusals["unknown metric"]


def test_a_window_below_prefects_minimum_is_refused(alerting: Alerting) -> None:
    assert "below Prefect's minimum" in alerting.refusals["short window"]


def test_a_failed_round_runs_the_alert_flow_with_the_leaf_and_the_error(alerting: Alerting) -> None:
    (run,) = _alert_runs(alerting.prefect.api_url, "failed-round")
    assert run["state_type"] == "COMPLETED"
    assert run["parameters"]["leaf"] == alerting.leaf_name
    assert run["parameters"]["event"] == "branchkey.round.failed"
    assert run["parameters"]["automation"] == "branchkey-failed-round"
    assert "evaluation data unreadable" in run["parameters"]["payload"]["error"]


def _completed_rounds(alerting: Alerting) -> list[datetime]:
    """When the leaf's `branchkey.round.completed` events occurred, in order."""
    leaf_id = history_rows(alerting.work_dir)[0]["leaf_id"]
    found = events(alerting.prefect.api_url, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", HEALTHY_ROUNDS)
    return sorted(datetime.fromisoformat(event["occurred"]) for event in found)


def test_a_stopped_worker_runs_the_missed_round_alert_once_after_its_last_round(alerting: Alerting) -> None:
    last_round = _completed_rounds(alerting)[-1]
    runs = [run for run in _alert_runs(alerting.prefect.api_url, "missed-round")
            if datetime.fromisoformat(run["parameters"]["occurred"]) == last_round]
    assert len(runs) == 1 and runs[0]["parameters"]["leaf"] == alerting.leaf_name
    created = datetime.fromisoformat(runs[0]["created"])
    assert created > alerting.worker_stopped_at and created - last_round >= timedelta(seconds=WINDOW_S)


def test_a_missed_round_alert_follows_only_a_real_gap_of_the_window(alerting: Alerting) -> None:
    """On a loaded machine a healthy leaf may really go a window without a round; never a shorter gap."""
    rounds = _completed_rounds(alerting)
    for run in _alert_runs(alerting.prefect.api_url, "missed-round"):
        occurred = datetime.fromisoformat(run["parameters"]["occurred"])
        following = [moment for moment in rounds if moment > occurred]
        assert occurred in rounds and datetime.fromisoformat(run["created"]) - occurred >= timedelta(seconds=WINDOW_S)
        assert not following or following[0] - occurred >= timedelta(seconds=WINDOW_S), (occurred, following[0])


def test_a_metric_drop_runs_the_alert_flow_for_the_watched_metric_only(alerting: Alerting) -> None:
    (run,) = _alert_runs(alerting.prefect.api_url, "metric-drop")
    assert run["state_type"] == "COMPLETED" and run["parameters"]["payload"]["metric"] == "accuracy"


def test_each_alert_is_a_version_of_the_leafs_alert_artifact(alerting: Alerting) -> None:
    versions = artifacts(alerting.prefect.api_url, artifact_key("alert", alerting.leaf_name))
    newest = {version["description"].rsplit(": ", 1)[1]: version["data"] for version in reversed(versions)}
    missed, dropped, failed = newest["missed-round"], newest["metric-drop"], newest["failed-round"]
    assert missed.startswith(f"# {alerting.leaf_name} has not completed a round") and f"{WINDOW_S} s" in missed
    assert dropped.startswith(f"# {alerting.leaf_name} dropped below its best") and "a drop of 0.4" in dropped
    assert failed.startswith(f"# {alerting.leaf_name} failed a round") and "evaluation data unreadable" in failed


def test_each_alert_is_sent_through_the_notification_block(alerting: Alerting) -> None:
    texts = [body["text"] for body in alerting.hooked]
    leaf = alerting.leaf_name
    assert any(text.startswith(f"BranchKey: {leaf} failed a round: Leaf {leaf} failed round 1") for text in texts)
    assert any(text.startswith(f"BranchKey: {leaf} has not completed a round") for text in texts)
    assert any(text.startswith(f"BranchKey: {leaf}'s accuracy dropped below its best: Leaf {leaf}'s accuracy is 0.5 "
                               f"in round 2, down 0.4 from its best 0.9") for text in texts)


@pytest.mark.browser
def test_automations_page_renders_every_automation(alerting: Alerting, chromium: str, tmp_path: Path) -> None:
    """The list is a virtual scroller whose items a DOM dump may not hold, so the list page is
    checked for its count and each automation's own page for its name."""
    url = f"{alerting.prefect.url}/automations"
    listed = render_text(chromium, url, tmp_path, "automations", "4 automations")
    assert "4 automations" in listed, f"DOM (and a screenshot if it lacked that) in {tmp_path}"
    for automation in _automations(alerting.prefect.api_url):
        page = render_text(chromium, f"{url}/automation/{automation['id']}", tmp_path, automation["name"],
                           automation["name"])
        assert automation["name"] in page and automation["description"] in page, f"DOM in {tmp_path}"
