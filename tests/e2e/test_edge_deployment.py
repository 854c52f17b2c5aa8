"""End to end, as a user deploys it: `prefect server start`, bk_server with RabbitMQ,
`bk edge setup`, `prefect deploy --all` of the project's prefect.yaml, one process worker
per leaf, triggered retraining runs, then the rounds' interval schedule firing.

One federation is run once for the module; each test checks one thing it must show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import yaml

from prefect_branchkey.bk_blocks.archive import read_aggregate, read_update
from prefect_branchkey.bk_dev.demo import latest_artifact_id, latest_event_page
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.bk_dev.processes import spawn, stop_group
from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.publishing.assets import MATERIALIZED, global_model_asset
from prefect_branchkey.flows.publishing.observability import artifact_key

from ..support.bkserver import BkServer
from ..support.browser import render_text
from ..support.flow_helpers import artifacts
from ..support.http import LOCAL
from ..support.process_helpers import assert_none_left, left_running, new_marker
from ..support.reference import fedavg_reference

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq]

PROJECT = Path(__file__).resolve().parents[2]
# The leaves prefect.yaml deploys: the names the platform gives branch `digits`'s leaves.
BRANCH = "digits"
LEAVES = ("digits-leaf-1", "digits-leaf-2", "digits-leaf-3")
TRAINING_ROUNDS = 2
# prefect.yaml's retention: how many of the latest updates and global models a leaf keeps (null: all).
RETENTION = yaml.safe_load((PROJECT / "prefect.yaml").read_text())["definitions"]["round_parameters"]["retention"]
INTERVAL_S = 20
SCHEDULER_LOOP_S = 1
# The shortest `bk edge alerts --dashboard-every` allows: each dashboard run watches this long.
DASHBOARD_EVERY_S = 5
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# The message Prefect's server gives a run it cancels under a CANCEL_NEW concurrency limit.
SKIPPED_TICK = "Deployment concurrency limit reached."
LEAF_BUSY = "is in use by another run of this leaf"


@dataclass
class EdgeFederation:
    """What the scenario left behind to check: the servers' addresses, the leaves' dirs, and the
    pairs of runs of one leaf started at once (to collide)."""

    api: str
    server: BkServer
    work_root: Path
    leaf_names: dict[str, str]
    collisions: dict[str, tuple[str, str]]


def _run(command: list[str], env: dict[str, str]) -> str:
    """Run a CLI command as a user would, failing the test with its output if it fails."""
    result = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _api(api: str, method: str, path: str, body: Any = None) -> Any:
    """Call the Prefect REST API; a 503 (SQLite busy under the workers' load) is retried, as Prefect's client does."""
    for attempt in range(10):
        response = LOCAL.request(method, f"{api}{path}", json=body)
        if response.status_code != 503:
            break
        time.sleep(0.5 * (attempt + 1))
    response.raise_for_status()
    return response.json() if response.content else None


def _flow_runs(api: str) -> list[dict[str, Any]]:
    return _api(api, "POST", "/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 200})


def _deployments(api: str) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _api(api, "POST", "/deployments/filter", {"limit": 50})}


def _wait_until(condition: Any, timeout: float, what: str, story: Any = None) -> None:
    """Wait for `condition`; on a timeout, fail naming `what`, with what `story()` tells of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{story()}" if story else ""))


def _all_settled(api: str, deployment_ids: set[str] | None = None) -> bool:
    """Every run past Scheduled has ended (of these deployments only, when given)."""
    return all(run["state_type"] in TERMINAL for run in _flow_runs(api) if run["state_type"] != "SCHEDULED"
               and (deployment_ids is None or run["deployment_id"] in deployment_ids))


def _dashboard_rounds(api: str) -> list[int]:
    """The rounds the latest federation artifact shows with no leaf missing."""
    versions = artifacts(api, artifact_key("federation", BRANCH))
    return [row["round"] for row in json.loads(versions[0]["data"]) if row["missing"] == "-"] if versions else []


def _dashboard_story(api: str) -> str:
    """What a dashboard failure needs: the dashboard runs and the round events, in time order."""
    deployment_id = _deployments(api)["ops-dashboard"]["id"]
    runs = [f"run {r['name']} {r['state_name']} created {r['created']} start {r['start_time']} end {r['end_time']} "
            f"{r['parameters']}" for r in _flow_runs(api) if r["deployment_id"] == deployment_id]
    found = _api(api, "POST", "/events/filter", {"filter": {
        "event": {"prefix": ["branchkey.round."]}, "occurred": {"since": "2000-01-01T00:00:00Z"}, "order": "ASC"},
        "limit": 50})["events"]
    events = [f"event {e['event']} {e['resource'].get('prefect.resource.name')} round {e['payload'].get('round')} "
              f"occurred {e['occurred']} received {e['received']}" for e in found]
    return "\n".join(sorted(runs + events, key=lambda line: line.split(" occurred ")[-1].split(" created ")[-1]))


def _dashboard_settled(api: str, rounds: list[int]) -> bool:
    """The dashboard shows these rounds with no leaf missing, and no run is waiting for a slot."""
    waiting = any(r["state_name"] == "AwaitingConcurrencySlot" for r in _flow_runs(api))
    return not waiting and _all_settled(api) and _dashboard_rounds(api) == rounds


def _settle_with_the_dashboard(api: str, deployments: dict[str, dict[str, Any]], work_root: Path) -> None:
    """Level the leaves, then wait for the dashboard automation's runs to show every round and end;
    again if a straggling scheduled round ran meanwhile."""
    for _ in range(3):
        _catch_up(api, deployments, work_root)
        rounds = list(range(1, len(history_rows(work_root / "digits-leaf-1")) + 1))
        _wait_until(lambda: _dashboard_settled(api, rounds), 240,  # noqa: B023 -- called within the iteration
                    f"the dashboard automation to publish rounds {rounds}", lambda: _dashboard_story(api))
        if len(history_rows(work_root / "digits-leaf-1")) == len(rounds):
            return
    raise AssertionError("the leaves kept running rounds after their schedules were paused")


def _set_rounds_schedules(api: str, deployments: dict[str, dict[str, Any]], active: bool,
                          interval_s: float | None = None) -> None:
    """Activate (with a new interval, all anchored alike) or pause every leaf's rounds schedule."""
    anchor = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    for leaf in LEAVES:
        deployment = deployments[f"{leaf}-rounds"]
        for schedule in deployment["schedules"]:
            body: dict[str, Any] = {"active": active}
            if interval_s is not None:
                body["schedule"] = {"interval": interval_s, "anchor_date": anchor, "timezone": "UTC"}
            _api(api, "PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", body)


def _delete_auto_scheduled_runs(api: str) -> int:
    """Delete every auto-scheduled run not yet picked up; return how many there were."""
    body = {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200}
    runs = [run for run in _api(api, "POST", "/flow_runs/filter", body) if run["auto_scheduled"]]
    for run in runs:
        _api(api, "DELETE", f"/flow_runs/{run['id']}")
    return len(runs)


def _pause_every_schedule(api: str, deployments: dict[str, dict[str, Any]]) -> None:
    """Pause every schedule, then delete their scheduled runs until none has appeared for three
    scheduler loops: a scheduler loop that read a schedule as active just before the pause
    inserts its runs just after it (seen: 86 runs of one leaf, 0.2 s after its pause)."""
    for deployment in deployments.values():
        for schedule in deployment["schedules"]:
            _api(api, "PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}", {"active": False})
    deadline = time.monotonic() + 60
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < max(3 * SCHEDULER_LOOP_S, 6):
        assert time.monotonic() < deadline, "the scheduler kept creating runs of paused schedules"
        if _delete_auto_scheduled_runs(api):
            quiet_since = time.monotonic()
        time.sleep(0.5)


def _create_run(api: str, deployment: dict[str, Any], parameters: dict[str, Any] | None = None) -> str:
    body = {"parameters": parameters} if parameters else {}
    return _api(api, "POST", f"/deployments/{deployment['id']}/create_flow_run", body)["id"]


def _leaf_deployment_ids(deployments: dict[str, dict[str, Any]]) -> set[str]:
    """The leaves' deployments (not the `ops` queue's alerts and dashboard)."""
    return {d["id"] for name, d in deployments.items() if name.startswith(LEAVES)}


def _catch_up(api: str, deployments: dict[str, dict[str, Any]], work_root: Path) -> None:
    """Run a round for any idle leaf behind the others, until every run has settled with the
    leaves level: pausing a schedule can delete some leaves' runs of a tick after others started
    theirs, and those would wait for the missing updates until their timeout. The dashboard's
    runs are not waited for here."""
    leaf_deployments = _leaf_deployment_ids(deployments)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        active = {r["deployment_id"] for r in _flow_runs(api) if r["state_type"] not in TERMINAL}
        done = {leaf: len(history_rows(work_root / leaf)) for leaf in LEAVES}
        busy = {leaf: deployments[f"{leaf}-rounds"]["id"] in active for leaf in LEAVES}
        if not any(busy.values()) and len(set(done.values())) == 1 and _all_settled(api, leaf_deployments):
            return
        target = max(done[leaf] + busy[leaf] for leaf in LEAVES)
        for leaf in LEAVES:
            if not busy[leaf] and done[leaf] < target:
                _create_run(api, deployments[f"{leaf}-rounds"])
        time.sleep(1)
    raise AssertionError(f"the leaves did not settle level: {[len(history_rows(work_root / leaf)) for leaf in LEAVES]}")


@pytest.fixture(scope="module")
def edge(rabbitmq: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeFederation]:
    """Deploy the project to a real Prefect server and three workers; run the federation; tear down."""
    root = tmp_path_factory.mktemp("edge")
    marker = new_marker()
    bin_dir = str(Path(sys.executable).parent)
    prefect = LocalPrefectServer(root / "prefect-home", settings={
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(SCHEDULER_LOOP_S),
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": str(SCHEDULER_LOOP_S),
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_LOGGING_LEVEL": "WARNING", "PATH": f"{bin_dir}:{os.environ['PATH']}", marker[0]: marker[1],
    })
    server = BkServer(root / "bk", amqp=True)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        prefect.start()
        server.start()
        # The machine that deploys has none of the workers' variables: they are resolved on the workers.
        deployer_env = prefect.client_env()
        env = deployer_env | {"BRANCHKEY_PROJECT_DIR": str(PROJECT), "BRANCHKEY_WORK_ROOT": str(root / "leaves")}
        federation = server.federation(leaves=3, tree="edge", branch=BRANCH)
        paths = write_credentials(root / "creds", federation.leaves)
        _run(["bk", "edge", "setup", *map(str, paths),
              "--host", server.url, "--transport", "amqp", "--amqp-host", "127.0.0.1"], deployer_env)
        _run(["prefect", "--no-prompt", "deploy", "--all"], deployer_env)
        deployments = _deployments(prefect.api_url)
        _pause_every_schedule(prefect.api_url, deployments)
        _run(["bk", "edge", "alerts", "--missed-round-after", "3600", "--dashboard-every", str(DASHBOARD_EVERY_S)],
             deployer_env)
        for queue in (*LEAVES, "ops"):
            workers.append(spawn(["prefect", "worker", "start", "--pool", "branchkey-edge", "--work-queue", queue,
                                  "--name", f"edge-{queue}"], root / f"worker-{queue}.log", env=env))
        for leaf in LEAVES:  # as `prefect deployment run` does (the docs' trial runs that command)
            _create_run(prefect.api_url, deployments[f"{leaf}-nightly"], {"rounds_per_run": TRAINING_ROUNDS})
        _wait_until(lambda: sum(r["state_type"] == "COMPLETED" and r["parent_task_run_id"] is None
                                for r in _flow_runs(prefect.api_url)) >= len(LEAVES), 300,
                    "the triggered retraining runs")
        _wait_until(lambda: _all_settled(prefect.api_url, _leaf_deployment_ids(deployments)), 120,
                    "the retraining runs to settle")
        collisions = {leaf: (_create_run(prefect.api_url, deployments[f"{leaf}-rounds"]),
                             _create_run(prefect.api_url, deployments[f"{leaf}-rounds"])) for leaf in LEAVES}
        _catch_up(prefect.api_url, deployments, root / "leaves")
        _set_rounds_schedules(prefect.api_url, deployments, active=True, interval_s=INTERVAL_S)
        _wait_until(lambda: {r["deployment_id"] for r in _flow_runs(prefect.api_url)
                             if r["auto_scheduled"] and r["state_type"] == "COMPLETED"}
                    >= {deployments[f"{leaf}-rounds"]["id"] for leaf in LEAVES}, 240,
                    "the interval schedule to fire a round for every leaf")
        _pause_every_schedule(prefect.api_url, deployments)
        _catch_up(prefect.api_url, deployments, root / "leaves")
        _settle_with_the_dashboard(prefect.api_url, deployments, root / "leaves")
        names = {leaf: json.loads(Path(p).read_text())["name"] for leaf, p in zip(LEAVES, paths, strict=True)}
        yield EdgeFederation(prefect.api_url, server, root / "leaves", names, collisions)
    finally:
        for worker in workers:
            stop_group(worker)
        prefect.stop()
        server.stop()
        server.cleanup_broker()
        assert_none_left(marker)


def _skipped_while_its_leaf_ran(run: dict[str, Any], runs: list[dict[str, Any]],
                                leaf_of: dict[str, str]) -> bool:
    """A run cancelled because another run of its leaf held the leaf, as prefect.yaml asks: the
    server's CANCEL_NEW limit skips a tick due while the leaf's previous round holds its slot (a
    round slower than the interval), and the flow cancels a run that finds the work dir held.

    The holder holds the leaf from when it was due (it takes the slot when a worker picks it up,
    well before it runs) until a little after its end time: the end time is stamped by the flow's
    process, and the server releases the slot when that state reaches it. So the skipped run's
    wait, from when it was due to when it was cancelled, must overlap the holder's."""
    message = run["state"]["message"] or ""
    leaf = leaf_of.get(run["deployment_id"])
    if leaf is None or run["state_type"] != "CANCELLED" or not (message == SKIPPED_TICK or LEAF_BUSY in message):
        return False
    due = datetime.fromisoformat(run["expected_start_time"])
    cancelled_at = datetime.fromisoformat(run["state"]["timestamp"])
    return any(other["state_type"] == "COMPLETED" and leaf_of.get(other["deployment_id"]) == leaf
               and datetime.fromisoformat(other["expected_start_time"]) <= cancelled_at
               and due <= datetime.fromisoformat(other["end_time"]) for other in runs)


def test_every_flow_run_completed_but_the_colliding_ones(edge: EdgeFederation) -> None:
    collided = {run_id for pair in edge.collisions.values() for run_id in pair}
    every_run = _flow_runs(edge.api)
    runs = [r for r in every_run if r["id"] not in collided]
    assert len(runs) >= 2 * len(LEAVES), "a retraining run and scheduled rounds per leaf"
    assert [r for r in runs if r["state_type"] == "COMPLETED"], "no run completed"
    leaf_of = {d["id"]: name.rsplit("-", 1)[0] for name, d in _deployments(edge.api).items()}
    # A tick may be skipped while any run of its leaf ran, the collision pairs' included.
    unexplained = [(r["name"], r["state_name"], r["state"]["message"], r["state"]["timestamp"]) for r in runs
                   if r["state_type"] != "COMPLETED" and not _skipped_while_its_leaf_ran(r, every_run, leaf_of)]
    assert unexplained == []


def test_two_runs_of_one_leaf_at_once_end_one_completed_one_cancelled(edge: EdgeFederation) -> None:
    states = {r["id"]: r["state_type"] for r in _flow_runs(edge.api)}
    for leaf, pair in edge.collisions.items():
        assert sorted(states[run_id] for run_id in pair) == ["CANCELLED", "COMPLETED"], leaf


def test_each_leaf_ran_on_its_own_queue(edge: EdgeFederation) -> None:
    runs = [r for r in _flow_runs(edge.api) if r["deployment_id"]]
    deployments = {d["id"]: d for d in _deployments(edge.api).values()}
    for run in runs:
        leaf = deployments[run["deployment_id"]]["name"].rsplit("-", 1)[0]
        assert run["work_queue_name"] == leaf, (run["name"], run["work_queue_name"])


def test_every_kept_round_aggregate_is_the_fedavg_of_the_leaves_uploads(edge: EdgeFederation) -> None:
    """prefect.yaml's retention keeps a leaf's latest updates and global models, and the schedule
    runs as many rounds as the scenario's time allows: the rounds with both kept are checked, and
    the updates kept are exactly those of the latest rounds."""
    histories = {leaf: history_rows(edge.work_root / leaf) for leaf in LEAVES}
    rounds = [r["round"] for r in histories["digits-leaf-1"]]
    assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) >= TRAINING_ROUNDS + 1
    with_update = _latest(rounds, RETENTION["keep_updates"])
    for leaf in LEAVES:
        assert sorted(p.name for p in (edge.work_root / leaf / "updates").glob("run*-round*.npz")) == sorted(
            f"run1-round{r}.npz" for r in with_update), leaf
    checked = _latest(with_update, RETENTION["keep_models"])
    for index, round_number in ((rounds.index(r), r) for r in checked):
        aggregation_ids = {histories[leaf][index]["aggregation_id"] for leaf in LEAVES}
        assert len(aggregation_ids) == 1, f"round {round_number}: leaves disagree on the aggregate"
        (aggregation_id,) = aggregation_ids
        updates = [read_update(edge.work_root / leaf / "updates" / f"run1-round{round_number}.npz") for leaf in LEAVES]
        expected = fedavg_reference(updates)
        for leaf in LEAVES:
            downloaded = read_aggregate(edge.work_root / leaf / "models" / f"{aggregation_id}.npz")
            for got, want in zip(downloaded, expected, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _latest(rounds: list[int], keep: int | None) -> list[int]:
    """The rounds whose files a retention count of `keep` leaves (None keeps every one)."""
    return rounds if keep is None else rounds[-keep:]


def test_round_history_artifacts_exist_for_every_leaf(edge: EdgeFederation) -> None:
    for leaf in LEAVES:
        rounds = len(history_rows(edge.work_root / leaf))
        versions = artifacts(edge.api, artifact_key("history", leaf))
        assert len(versions) == rounds, f"{leaf}: one history version per round"
        assert [row["round"] for row in json.loads(versions[0]["data"])] == list(range(1, rounds + 1))


def test_a_leaf_has_one_name_from_its_credentials_to_its_runs(edge: EdgeFederation) -> None:
    """Set up from the platform's files as issued, each leaf's platform name names its Block, its
    queue (which prefect.yaml's deployments use), its work dir, and its runs' tags and queue."""
    assert edge.leaf_names == {leaf: leaf for leaf in LEAVES}
    queues = {q["name"] for q in _api(edge.api, "POST", "/work_pools/branchkey-edge/queues/filter", {})}
    blocks = {b["name"] for b in _api(edge.api, "POST", "/block_documents/filter",
                                      {"block_types": {"slug": {"any_": ["branchkey-credentials"]}}})}
    assert set(LEAVES) <= queues and set(LEAVES) <= blocks
    for leaf in LEAVES:
        tagged = [r for r in _flow_runs(edge.api) if f"leaf:{leaf}" in r["tags"]]
        assert tagged and {r["work_queue_name"] for r in tagged} == {leaf}
        assert {row["leaf_name"] for row in history_rows(edge.work_root / leaf)} == {leaf}


def test_runs_are_named_and_tagged_by_leaf_and_branch(edge: EdgeFederation) -> None:
    """The retraining run does its rounds itself; every other round is a run of the rounds deployment."""
    leaf = "digits-leaf-1"
    branch_id = history_rows(edge.work_root / "digits-leaf-1")[0]["branch_id"]
    runs = [r for r in _flow_runs(edge.api) if r["state_type"] == "COMPLETED" and leaf in r["name"]]
    rounds = [r for r in runs if r["name"].startswith(f"{leaf}-round-")]
    assert [r["name"] for r in runs if r not in rounds] == [f"{leaf}-training"]
    assert len(rounds) == len(history_rows(edge.work_root / "digits-leaf-1")) - TRAINING_ROUNDS
    for run in runs:
        assert {f"leaf:{leaf}", f"branch:{BRANCH}", f"branch-id:{branch_id}"} <= set(run["tags"])


def test_the_drift_deployment_evaluates_on_the_leafs_worker_and_uploads_nothing(edge: EdgeFederation) -> None:
    """Runs after the tests that count history rows: it adds an `evaluated` row to digits-leaf-1's."""
    before = history_rows(edge.work_root / "digits-leaf-1")
    branch_id = before[0]["branch_id"]
    uploads = sum(r["updates"] for r in edge.server.status(branch_id)["rounds"])
    run_id = _create_run(edge.api, _deployments(edge.api)["digits-leaf-1-drift"])
    _wait_until(lambda: _api(edge.api, "GET", f"/flow_runs/{run_id}")["state_type"] in TERMINAL, 180,
                "the drift check")
    run = _api(edge.api, "GET", f"/flow_runs/{run_id}")
    assert run["state_type"] == "COMPLETED" and run["work_queue_name"] == "digits-leaf-1", run["state"]["message"]
    after = history_rows(edge.work_root / "digits-leaf-1")
    assert [r["status"] for r in after[len(before):]] == ["evaluated"] and after[-1]["round"] == before[-1]["round"]
    assert sum(r["updates"] for r in edge.server.status(branch_id)["rounds"]) == uploads


def test_serve_runs_one_leafs_rounds_on_its_interval_without_a_worker(server: BkServer, tmp_path: Path) -> None:
    marker = new_marker()
    prefect = LocalPrefectServer(tmp_path / "prefect-home", settings={
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(SCHEDULER_LOOP_S), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", marker[0]: marker[1]})
    serving: subprocess.Popen[bytes] | None = None
    try:
        env = prefect.start().client_env()
        federation = server.federation(leaves=1)
        (path,) = write_credentials(tmp_path / "creds", federation.leaves)
        _run(["bk", "edge", "setup", f"solo={path}", "--host", server.url], env)
        serving = spawn(["bk", "edge", "serve", "solo",
                         "--participant", "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                         "--work-dir", str(tmp_path / "solo"), "--interval-s", "4", "--cron", "",
                         "--participant-options", '{"leaf_index": 0, "leaves": 1}'], tmp_path / "serve.log", env=env)
        _wait_until(lambda: sum(r["state_type"] == "COMPLETED" for r in _flow_runs(prefect.api_url)) >= 2, 180,
                    "two scheduled rounds served")
        assert {d for d in _deployments(prefect.api_url)} == {"solo-rounds"}
    finally:
        if serving is not None:
            stop_group(serving)
        prefect.stop()
    assert [row["round"] for row in history_rows(tmp_path / "solo")][:2] == [1, 2]
    assert left_running(marker) == []


def test_the_dashboard_automation_shows_every_leaf_side_by_side_for_every_round(edge: EdgeFederation) -> None:
    """The fixture waited for the dashboard to show every round with no leaf missing; here, its columns."""
    rounds = sorted({row["round"] for row in history_rows(edge.work_root / "digits-leaf-1")})  # the drift check's too
    (latest, *_) = artifacts(edge.api, artifact_key("federation", BRANCH))
    table = json.loads(latest["data"])
    assert [row["round"] for row in table] == rounds, _dashboard_story(edge.api)
    for row in table:
        assert all(f"{leaf} accuracy" in row for leaf in LEAVES), row


def _page(edge: EdgeFederation, chromium: str, tmp_path: Path, url: str, expect: str, name: str) -> str:
    """A Prefect UI page's text as Chromium renders it; its DOM (and screenshot) kept in tmp_path."""
    return render_text(chromium, f"{edge.api.removesuffix('/api')}{url}", tmp_path, name, expect)


def _artifact_page(edge: EdgeFederation, key: str) -> str:
    artifact_id = latest_artifact_id(edge.api, key)
    assert artifact_id, f"no artifact {key}"
    return f"/artifacts/artifact/{artifact_id}"


@pytest.mark.browser
def test_the_deployed_federation_page_shows_every_leaf_by_name(edge: EdgeFederation, chromium: str,
                                                                 tmp_path: Path) -> None:
    names = [leaf for leaf in LEAVES]
    text = _page(edge, chromium, tmp_path, _artifact_page(edge, artifact_key("federation", BRANCH)),
                 f"{names[-1]} accuracy", "federation")
    assert all(f"{name} accuracy" in text for name in names) and "mean accuracy" in text, f"see {tmp_path}"


@pytest.mark.browser
def test_a_deployed_leafs_history_page_renders_its_rounds(edge: EdgeFederation, chromium: str,
                                                          tmp_path: Path) -> None:
    leaf = "digits-leaf-1"
    text = _page(edge, chromium, tmp_path, _artifact_page(edge, artifact_key("history", leaf)), "aggregation_id",
                 "history")
    assert "aggregation_id" in text and leaf in text, f"see {tmp_path}"


@pytest.mark.browser
def test_the_runs_page_filtered_by_a_leafs_tag_lists_its_rounds(edge: EdgeFederation, chromium: str,
                                                                tmp_path: Path) -> None:
    leaf = "digits-leaf-1"
    text = _page(edge, chromium, tmp_path, f"/runs?tag={quote(f'leaf:{leaf}')}", f"{leaf}-round-", "runs")
    assert f"{leaf}-round-" in text, f"see {tmp_path}"
    assert f"{'digits-leaf-2'}-round-" not in text, f"another leaf's runs shown; see {tmp_path}"


@pytest.mark.browser
def test_the_automations_page_lists_the_dashboard_automation(edge: EdgeFederation, chromium: str,
                                                             tmp_path: Path) -> None:
    (automation,) = [a for a in _api(edge.api, "POST", "/automations/filter", {}) if a["name"] == "branchkey-dashboard"]
    text = _page(edge, chromium, tmp_path, f"/automations/automation/{automation['id']}", "branchkey-dashboard",
                 "automation")
    assert "branchkey-dashboard" in text and f"at most once per {DASHBOARD_EVERY_S} s" in text, f"see {tmp_path}"


@pytest.mark.browser
def test_a_materialization_event_page_renders(edge: EdgeFederation, chromium: str, tmp_path: Path) -> None:
    row = history_rows(edge.work_root / "digits-leaf-1")[-1]
    asset = global_model_asset(row["tree_id"], row["branch_id"]).key
    page = latest_event_page("", edge.api, MATERIALIZED, asset)
    assert page, f"no materialization of {asset}"
    text = _page(edge, chromium, tmp_path, page, "prefect.asset.materialization.succeeded", "materialization")
    assert "prefect.asset.materialization.succeeded" in text and "global-model" in text, f"see {tmp_path}"
