"""The pure parts of `bk edge worker`, the lost-run automation and `bk dev prefect-server`: the
automation's trigger and action, the refused windows, finding a run's process, the stop bound,
a taken port. The processes themselves are tested in tests/e2e/test_edge_workers.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from datetime import timedelta

import pytest
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import Posture

from prefect_branchkey.bk_dev.trial_server import PortInUseError, check_port
from prefect_branchkey.deployments.automations import LOST_RUN_AUTOMATION, lost_run_automation
from prefect_branchkey.deployments.edge import EdgeSetupError
from prefect_branchkey.deployments.worker import CANCEL_BOUND_S, TEARDOWN_S, flow_run_processes, stop_bound_s


def test_lost_run_automation_crashes_a_branchkey_run_whose_heartbeats_stopped() -> None:
    automation = lost_run_automation(300)
    trigger = automation.trigger
    assert automation.name == LOST_RUN_AUTOMATION
    assert trigger.posture == Posture.Proactive and trigger.within == timedelta(seconds=300)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                              "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match.model_dump() == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger.match_related.model_dump() == {"prefect.resource.role": "tag",
                                                  "prefect.resource.id": "prefect.tag.branchkey"}
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED


@pytest.mark.parametrize("seconds", [30, 59.9, float("nan"), float("inf")])
def test_a_lost_run_window_shorter_than_two_heartbeats_is_refused(seconds: float) -> None:
    with pytest.raises(EdgeSetupError, match="--lost-run-after must be at least 60 s"):
        lost_run_automation(seconds)


def test_a_child_carrying_a_flow_run_id_is_a_run_in_progress_and_leads_its_group() -> None:
    run_id = uuid.uuid4()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True,
                             env={**os.environ, "PREFECT__FLOW_RUN_ID": str(run_id)})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert flow_run_processes() == {run_id: child.pid}
        assert os.getpgid(child.pid) == child.pid
    finally:
        for process in (child, other):
            process.kill()
            process.wait()
    assert flow_run_processes() == {}


def test_a_stop_takes_at_most_the_grace_the_cancellation_and_the_teardown() -> None:
    assert stop_bound_s(120) == 120 + CANCEL_BOUND_S + TEARDOWN_S == 180


def test_a_taken_port_is_refused_naming_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        expected = rf"port {port} on 127.0.0.1 is in use .* --port \(e\.g\. --port \d+\)"
        with pytest.raises(PortInUseError, match=expected):
            check_port(port)
