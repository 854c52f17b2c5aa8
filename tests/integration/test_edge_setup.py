"""Edge set-up (`bk edge setup`), the deployments file, and what keeps one leaf to one round at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.deployments.edge import EdgeSetupError, LeafSpec, set_up_edge
from prefect_branchkey.flows.leaf.state import LeafBusyError, WorkDirError, hold_work_dir, resolve_work_dir
from prefect_branchkey.flows.round import federated_round
from prefect_branchkey.tasks import resolve_credentials

from ..support.bkserver import BkServer, credentials_for

PROJECT = Path(__file__).resolve().parents[2]
PLATFORM_JSON = {"id": "3f1c", "name": "clinic-a", "session_token": "s3cr3t-token", "tree_id": "t1",
                 "branch_id": "b1", "owner_id": "o1"}


@pytest.fixture
def leaf_json(tmp_path: Path) -> Path:
    path = tmp_path / "clinic-a.json"
    path.write_text(json.dumps(PLATFORM_JSON))
    return path


ALERTS_ENTRYPOINT = "prefect_branchkey.flows.alerts:branchkey_alert"
DASHBOARD_ENTRYPOINT = "prefect_branchkey.flows.federation.dashboard:federation_dashboard"


def _all_deployments() -> list[dict[str, Any]]:
    return yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]


def _deployments() -> list[dict[str, Any]]:
    """The leaves' deployments (the alert and dashboard deployments serve no leaf)."""
    return [deployment for deployment in _all_deployments()
            if deployment["entrypoint"] not in (ALERTS_ENTRYPOINT, DASHBOARD_ENTRYPOINT)]


def test_leaf_set_up_from_its_file_alone_takes_its_platform_name(prefect_api: str, tmp_path: Path) -> None:
    name = f"clinic-{uuid.uuid4().hex[:8]}"
    issued = tmp_path / "issued-by-the-platform.json"
    issued.write_text(json.dumps(PLATFORM_JSON | {"name": name}))
    pool = f"edge-{uuid.uuid4().hex[:8]}"
    set_up_edge([LeafSpec.parse(str(issued))], "http://127.0.0.1:9", "amqp", pool)
    assert httpx.get(f"{prefect_api}/work_pools/{pool}/queues/{name}", timeout=30).status_code == 200
    assert BranchKeyCredentials.load(name).leaf_name == name


def test_two_leaves_with_one_name_are_refused_before_anything_is_set_up(prefect_api: str, leaf_json: Path,
                                                                        tmp_path: Path) -> None:
    other = tmp_path / "other-federation.json"
    other.write_text(json.dumps(PLATFORM_JSON | {"id": "9a2e"}))
    pool = f"edge-{uuid.uuid4().hex[:8]}"
    with pytest.raises(EdgeSetupError, match="two leaves would share the Block and queue clinic-a"):
        set_up_edge([LeafSpec.parse(str(leaf_json)), LeafSpec.parse(str(other))], "http://127.0.0.1:9", pool=pool)
    assert httpx.get(f"{prefect_api}/work_pools/{pool}", timeout=30).status_code == 404


def test_platform_name_that_cannot_name_a_block_asks_for_one(prefect_api: str, tmp_path: Path) -> None:
    issued = tmp_path / "clinic.json"
    issued.write_text(json.dumps(PLATFORM_JSON | {"name": "Clinic A"}))
    with pytest.raises(EdgeSetupError, match=rf"{issued}: the platform's leaf name 'Clinic A' cannot name a Block.*"
                                             rf"NAME={issued}"):
        set_up_edge([LeafSpec.parse(str(issued))], "http://127.0.0.1:9")


def test_leaf_name_that_cannot_be_a_block_name_is_refused() -> None:
    with pytest.raises(EdgeSetupError, match="'Clinic_A' cannot name a Block and queue"):
        LeafSpec.parse("Clinic_A=creds/a.json")


def test_setup_creates_the_pool_the_leafs_queue_and_the_credentials_block(prefect_api: str,
                                                                         leaf_json: Path) -> None:
    pool = f"edge-{uuid.uuid4().hex[:8]}"
    set_up_edge([LeafSpec("clinic-a", leaf_json)], "http://127.0.0.1:9", "amqp", pool)
    assert httpx.get(f"{prefect_api}/work_pools/{pool}", timeout=30).json()["type"] == "process"
    assert httpx.get(f"{prefect_api}/work_pools/{pool}/queues/clinic-a", timeout=30).status_code == 200
    block = BranchKeyCredentials.load("clinic-a")
    assert block.leaf_name == "clinic-a" and block.notification_transport == "amqp"
    assert block.session_token.get_secret_value() == "s3cr3t-token"


def test_setup_again_updates_the_block(prefect_api: str, leaf_json: Path) -> None:
    pool = f"edge-{uuid.uuid4().hex[:8]}"
    set_up_edge([LeafSpec("clinic-a", leaf_json)], "http://127.0.0.1:9", "amqp", pool)
    set_up_edge([LeafSpec("clinic-a", leaf_json)], "http://127.0.0.1:10", "websocket", pool)
    assert BranchKeyCredentials.load("clinic-a").host == "http://127.0.0.1:10"


def test_setup_with_a_bad_credentials_file_changes_nothing(prefect_api: str, leaf_json: Path, tmp_path: Path) -> None:
    pool = f"edge-{uuid.uuid4().hex[:8]}"
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "x"}')
    with pytest.raises(EdgeSetupError, match=r"broken\.json.*missing"):
        set_up_edge([LeafSpec("clinic-b", leaf_json), LeafSpec("broken", broken)], "http://127.0.0.1:9", pool=pool)
    assert httpx.get(f"{prefect_api}/work_pools/{pool}", timeout=30).status_code == 404
    with pytest.raises(ValueError, match="Unable to find block document named clinic-b"):
        BranchKeyCredentials.load("clinic-b")


def _setup_cli(tmp_path: Path, leaf: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefect_branchkey.deployments.cli", "edge", "setup",
                           leaf or f"a={tmp_path / 'none.json'}", "--host", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env)


def test_setup_cli_names_the_problem_without_a_traceback(prefect_api: str, tmp_path: Path) -> None:
    result = _setup_cli(tmp_path, PREFECT_API_URL=prefect_api)
    assert result.returncode == 2
    assert "cannot read leaf credentials" in result.stderr and "Traceback" not in result.stderr


def test_setup_cli_says_both_names_when_the_block_is_named_otherwise(prefect_api: str, leaf_json: Path,
                                                                    tmp_path: Path) -> None:
    result = _setup_cli(tmp_path, f"site-a={leaf_json}", PREFECT_API_URL=prefect_api)
    assert result.returncode == 0, result.stderr
    assert "leaf clinic-a: Block branchkey-credentials/site-a, queue branchkey-edge/site-a" in result.stdout
    assert "its runs, tags and artifacts say clinic-a, its Block and queue site-a" in result.stdout


def test_setup_without_a_prefect_server_refuses_rather_than_use_a_throwaway_one(tmp_path: Path) -> None:
    result = _setup_cli(tmp_path, PREFECT_HOME=str(tmp_path / "home"))
    assert result.returncode == 2 and "PREFECT_API_URL is not set" in result.stderr


def test_every_deployment_runs_on_its_leafs_queue_one_run_at_a_time() -> None:
    for deployment in _deployments():
        leaf = deployment["name"].rsplit("-", 1)[0]
        assert deployment["work_pool"] == {"name": "branchkey-edge", "work_queue_name": leaf}
        assert deployment["parameters"]["credentials"] == leaf
        assert deployment["parameters"]["work_dir"] == f"$BRANCHKEY_WORK_ROOT/{leaf}"
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_the_alert_deployment_runs_unscheduled_on_the_ops_queue_of_the_pool() -> None:
    (alerts,) = [deployment for deployment in _all_deployments() if deployment["entrypoint"] == ALERTS_ENTRYPOINT]
    assert alerts["name"] == "ops-alerts" and not alerts.get("schedules")
    assert alerts["work_pool"] == {"name": "branchkey-edge", "work_queue_name": "ops"}


def test_the_dashboard_deployment_runs_unscheduled_on_the_ops_queue_one_run_at_a_time() -> None:
    (dashboard,) = [deployment for deployment in _all_deployments() if deployment["entrypoint"] == DASHBOARD_ENTRYPOINT]
    assert dashboard["work_pool"] == {"name": "branchkey-edge", "work_queue_name": "ops"}
    assert dashboard["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert not dashboard.get("schedules") and not dashboard.get("triggers")


def test_deployments_pull_the_code_explicitly_from_the_workers_checkout() -> None:
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory":
                             {"directory": "{{ $BRANCHKEY_PROJECT_DIR }}"}}]


def test_deployments_have_rounds_a_retraining_and_a_drift_check_per_leaf() -> None:
    kinds: dict[str, set[str]] = {}
    for deployment in _deployments():
        (schedule,) = deployment["schedules"]
        kinds.setdefault(deployment["name"].rsplit("-", 1)[0], set()).add(
            f"{deployment['entrypoint']} {'cron' if 'cron' in schedule else 'interval'}")
    assert set(kinds) == {"digits-leaf-1", "digits-leaf-2", "digits-leaf-3"}
    for leaf_kinds in kinds.values():
        assert leaf_kinds == {"prefect_branchkey.flows.training:federated_training cron",
                              "prefect_branchkey.flows.round:federated_round interval",
                              "prefect_branchkey.flows.evaluation:federated_evaluation cron"}


def test_work_dir_variables_are_expanded_on_the_machine_that_runs_it(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("BRANCHKEY_WORK_ROOT", str(tmp_path))
    assert resolve_work_dir("$BRANCHKEY_WORK_ROOT/leaf-1") == tmp_path / "leaf-1"


def test_work_dir_naming_an_unset_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRANCHKEY_WORK_ROOT", raising=False)
    with pytest.raises(WorkDirError, match="not set on this machine"):
        resolve_work_dir("$BRANCHKEY_WORK_ROOT/leaf-1")


@contextmanager
def held_by_another_process(work_dir: Path) -> Iterator[int]:
    """Another process holding the work dir (as another run of the leaf would); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from prefect_branchkey.flows.leaf.state import hold_work_dir\n"
        f"with hold_work_dir(Path({str(work_dir)!r})):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=PROJECT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_work_dir_held_by_another_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with (held_by_another_process(tmp_path) as pid, pytest.raises(LeafBusyError, match=f"pid {pid}"),
          hold_work_dir(tmp_path)):
        pass


def test_a_round_of_a_leaf_busy_elsewhere_ends_cancelled_and_touches_nothing(
        prefect_api: str, server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    with held_by_another_process(tmp_path / "leaf") as pid:
        state = federated_round(credentials_for(server, federation.leaves[0]),
                                "prefect_branchkey.flows.examples.digits:DigitsSoftmax", str(tmp_path / "leaf"),
                                {"leaf_index": 0, "leaves": 1}, return_state=True)
    assert state.is_cancelled() and f"pid {pid}" in (state.message or "")
    assert not (tmp_path / "leaf" / "state.json").exists()
    assert server.status(federation.branch_id)["rounds"][0]["updates"] == 0


def test_a_released_work_dir_can_be_held_by_another_process(tmp_path: Path) -> None:
    with hold_work_dir(tmp_path):
        pass
    check = subprocess.run([sys.executable, "-c", (
        "from pathlib import Path; from prefect_branchkey.flows.leaf.state import hold_work_dir\n"
        f"with hold_work_dir(Path({str(tmp_path)!r})): print('free')")], capture_output=True, text=True, cwd=PROJECT)
    assert check.stdout.strip() == "free", check.stderr


def test_a_second_hold_in_this_process_is_refused_naming_this_process(tmp_path: Path) -> None:
    with hold_work_dir(tmp_path), pytest.raises(LeafBusyError, match=f"pid {os.getpid()}"), hold_work_dir(tmp_path):
        pass


def test_another_thread_cannot_hold_a_work_dir_this_thread_holds(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def second_round() -> None:
        try:
            with hold_work_dir(tmp_path):
                pass
        except LeafBusyError as exc:
            errors.append(exc)

    with hold_work_dir(tmp_path):
        thread = threading.Thread(target=second_round)
        thread.start()
        thread.join()
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])


def test_credentials_env_builds_the_block_from_this_machines_settings(monkeypatch: pytest.MonkeyPatch,
                                                                      leaf_json: Path) -> None:
    monkeypatch.setenv("BRANCHKEY_CREDENTIALS_FILE", str(leaf_json))
    monkeypatch.setenv("BRANCHKEY_HOST", "http://127.0.0.1:9")
    block = resolve_credentials("$env")
    assert block.leaf_name == "clinic-a" and block.host == "http://127.0.0.1:9"


def test_credentials_env_error_never_echoes_the_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRANCHKEY_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("BRANCHKEY_LEAF_ID", "l1")
    monkeypatch.setenv("BRANCHKEY_SESSION_TOKEN", "s3cr3t-token")
    with pytest.raises(ValueError) as refused:
        resolve_credentials("$env")
    assert "BRANCHKEY_TREE_ID" in str(refused.value) and "s3cr3t-token" not in str(refused.value)


def test_credentials_env_without_settings_names_what_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("CREDENTIALS_FILE", "LEAF_ID", "SESSION_TOKEN"):
        monkeypatch.delenv(f"BRANCHKEY_{name}", raising=False)
    with pytest.raises(ValueError, match="BRANCHKEY_CREDENTIALS_FILE"):
        resolve_credentials("$env")
