"""`bk edge`: set a Prefect server up for edge leaves, or serve one leaf without a worker."""

from __future__ import annotations

import sys
from typing import Literal, NoReturn

from cyclopts import App

from prefect_branchkey.deployments.automations import ALERT_DEPLOYMENT, AlertOptions, set_up_alerts
from prefect_branchkey.deployments.edge import DEFAULT_POOL, EdgeSetupError, LeafSpec, set_up_edge
from prefect_branchkey.deployments.serve import serve_leaf
from prefect_branchkey.flows.participant import ParticipantError, parse_options

app = App(name="edge", help="Run BranchKey leaves on edge machines (see docs/edge-workers.md).")


def _fail(error: Exception) -> NoReturn:
    print(f"bk edge: {error}", file=sys.stderr)
    raise SystemExit(2)


@app.command
def setup(*leaves: str, host: str, transport: Literal["websocket", "amqp"] = "websocket",
          amqp_host: str | None = None, pool: str = DEFAULT_POOL) -> None:
    """Register the Block type, create the process work pool, and per leaf a work queue and a
    credentials Block, for `prefect deploy --all`.

    Parameters
    ----------
    leaves
        `NAME=PATH` per leaf: the Block and queue name and the platform's credentials JSON
        (`leaf-1=creds/leaf-1.json`); a bare PATH names the Block after the file.
    host
        The BranchKey API, e.g. https://app.branchkey.com.
    transport
        How aggregation notices arrive: websocket, or amqp (survives a restart mid-round).
    amqp_host
        RabbitMQ host, when it is not the API's host.
    pool
        The work pool's name (prefect.yaml names branchkey-edge).
    """
    settings = {"amqp_host": amqp_host} if amqp_host else {}
    try:
        specs = [LeafSpec.parse(text) for text in leaves]
        blocks = set_up_edge(specs, host, transport, pool, **settings)
    except EdgeSetupError as exc:
        _fail(exc)
    for spec, block in zip(specs, blocks, strict=True):
        print(f"leaf {block.leaf_name}: Block branchkey-credentials/{spec.name}, queue {pool}/{spec.name}")


@app.command
def alerts(*, missed_round_after: float, branch: str | None = None, participant: str | None = None,
           metric: str | None = None, notify_block: str | None = None,
           alert_deployment: str = ALERT_DEPLOYMENT) -> None:
    """Create (or update in place) the federation's automations, after `prefect deploy --all`:
    a leaf that missed its round, a failed round, and a metric drop, each running the alert deployment.

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
    """
    options = AlertOptions(missed_round_after, branch, participant, metric, notify_block, alert_deployment)
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
