"""`bk edge`: set a Prefect server up for edge leaves, run a leaf's worker, or serve one leaf without a worker."""

from __future__ import annotations

import sys
from typing import Literal, NoReturn

from cyclopts import App

from prefect_branchkey.deployments.automations import (
    ALERT_DEPLOYMENT,
    DASHBOARD_DEPLOYMENT,
    DEFAULT_DASHBOARD_EVERY_S,
    AlertOptions,
    check_lost_run_window,
    set_up_alerts,
    set_up_lost_runs,
)
from prefect_branchkey.deployments.edge import DEFAULT_POOL, EdgeSetupError, LeafSpec, set_up_edge
from prefect_branchkey.deployments.serve import serve_leaf
from prefect_branchkey.deployments.worker import DEFAULT_GRACE_S, HEARTBEAT_S, WorkerOptions, run_worker
from prefect_branchkey.flows.participant import ParticipantError, parse_options

app = App(name="edge", help="Run BranchKey leaves on edge machines (see docs/edge-workers.md).")


def _fail(error: Exception) -> NoReturn:
    print(f"bk edge: {error}", file=sys.stderr)
    raise SystemExit(2)


@app.command
def setup(*leaves: str, host: str, transport: Literal["websocket", "amqp"] = "websocket",
          amqp_host: str | None = None, pool: str = DEFAULT_POOL, lost_run_after: float | None = None) -> None:
    """Register the Block type, create the process work pool, and per leaf a work queue and a
    credentials Block, for `prefect deploy --all`; with --lost-run-after, the automation that sets
    a run without heartbeats Crashed.

    Parameters
    ----------
    leaves
        The platform's credentials JSON per leaf (`creds/digits-leaf-1.json`): the Block and
        queue take the leaf's name on the platform, as its runs, tags and artifacts do;
        `NAME=PATH` names them otherwise.
    host
        The BranchKey API, e.g. https://app.branchkey.com.
    transport
        How aggregation notices arrive: websocket, or amqp (survives a restart mid-round).
    amqp_host
        RabbitMQ host, when it is not the API's host.
    pool
        The work pool's name (prefect.yaml names branchkey-edge).
    lost_run_after
        Seconds without a heartbeat after which a BranchKey flow run is set Crashed (at least 60;
        e.g. 300): the automation `branchkey-lost-run`, created or updated in place.
    """
    settings = {"amqp_host": amqp_host} if amqp_host else {}
    try:
        if lost_run_after is not None:
            check_lost_run_window(lost_run_after)
        specs = [LeafSpec.parse(text) for text in leaves]
        blocks = set_up_edge(specs, host, transport, pool, **settings)
        created = set_up_lost_runs(lost_run_after) if lost_run_after is not None else None
    except EdgeSetupError as exc:
        _fail(exc)
    for spec, block in zip(specs, blocks, strict=True):
        name = spec.block_name(block)
        print(f"leaf {block.leaf_name}: Block branchkey-credentials/{name}, queue {pool}/{name}")
        if name != block.leaf_name:
            print(f"  note: its runs, tags and artifacts say {block.leaf_name}, its Block and queue {name}; "
                  f"drop '{name}=' to use one name for all")
    if created is not None:
        print(f"automation branchkey-lost-run: {'created' if created else 'updated'} (a BranchKey flow run without "
              f"a heartbeat for {lost_run_after:g} s is set Crashed)")


@app.command
def alerts(*, missed_round_after: float, branch: str | None = None, participant: str | None = None,
           metric: str | None = None, notify_block: str | None = None,
           alert_deployment: str = ALERT_DEPLOYMENT, dashboard_every: float = DEFAULT_DASHBOARD_EVERY_S,
           dashboard_deployment: str = DASHBOARD_DEPLOYMENT) -> None:
    """Create (or update in place) the federation's automations, after `prefect deploy --all`:
    a leaf that missed its round, a failed round, and a metric drop, each running the alert
    deployment; and the one that rebuilds the federation dashboard (`ops-dashboard`) after rounds.

    Parameters
    ----------
    missed_round_after
        Seconds without a completed round after which a leaf is reported (at least 10).
    branch
        The federation's branch id; without it, every BranchKey leaf on the server is watched.
    participant
        `package.module:Class` whose declared `metrics` the drop automation may watch; without
        it, no metric-drop automation.
    metric
        The metric watched for drops (default: the participant's primary one, accuracy if declared).
    notify_block
        A notification Block, `type/name` (e.g. slack-webhook/ops), to send every alert through too.
    alert_deployment
        The alert flow's deployment, `flow/deployment`.
    dashboard_every
        Seconds: the dashboard is rebuilt at most once per this window after a round's first event,
        and each run watches that long for the round's other leaves (at least 5).
    dashboard_deployment
        The dashboard flow's deployment, `flow/deployment`.
    """
    options = AlertOptions(missed_round_after, branch, participant, metric, notify_block, alert_deployment,
                           dashboard_every, dashboard_deployment)
    try:
        created = set_up_alerts(options)
    except EdgeSetupError as exc:
        _fail(exc)
    for automation, new in created:
        print(f"automation {automation.name}: {'created' if new else 'updated'} ({automation.description})")


@app.command
def serve(leaf: str, *, participant: str, work_dir: str, participant_options: str = "{}",
          interval_s: float = 900, cron: str | None = "0 2 * * *", rounds_per_run: int = 10) -> None:
    """Serve one leaf's deployments from this process: rounds every INTERVAL_S, retraining on CRON.

    Parameters
    ----------
    leaf
        The leaf's credentials Block name (saved by `bk edge setup`).
    participant
        `package.module:Class` of the participant.
    work_dir
        The leaf's work directory (state, models, history).
    participant_options
        The participant's keyword options, a JSON object.
    interval_s
        Seconds between rounds.
    cron
        When the retraining runs; an empty string: no retraining deployment.
    rounds_per_run
        Rounds per retraining run.
    """
    try:
        options = parse_options(participant_options)
    except ParticipantError as exc:
        _fail(exc)
    serve_leaf(leaf, participant, work_dir, options, interval_s, cron or None, rounds_per_run)


@app.command
def worker(leaf: str, *, grace_s: float = DEFAULT_GRACE_S, pool: str = DEFAULT_POOL,
           extra_queue: list[str] | None = None, name: str | None = None, heartbeat_s: int = HEARTBEAT_S,
           env_credentials: bool = False) -> None:
    """Run LEAF's process worker on its work queue until SIGTERM or Ctrl-C, which stop it within a
    bound: no new runs at once, a run in progress finishes within GRACE_S or is cancelled (its
    round resumes at the next run); the worker exits at most GRACE_S + 60 s after the signal.

    Parameters
    ----------
    leaf
        The leaf's queue and credentials Block name (as `bk edge setup` created them).
    grace_s
        Seconds a run in progress has to finish after a stop before it is cancelled.
    pool
        The work pool (prefect.yaml names branchkey-edge).
    extra_queue
        Serve this queue of the pool too (repeatable), e.g. ops for the alert runs.
    name
        The worker's name in the UI (default: LEAF@HOSTNAME, the same across restarts).
    heartbeat_s
        The runs' heartbeat interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, at least 30), which the
        lost-run automation watches.
    env_credentials
        The leaf's deployments take their credentials from the environment (`credentials: $env`):
        no credentials Block is required.
    """
    options = WorkerOptions(leaf, pool, tuple(extra_queue or ()), grace_s, name, heartbeat_s, not env_credentials)
    try:
        status = run_worker(options)
    except EdgeSetupError as exc:
        _fail(exc)
    raise SystemExit(status)
