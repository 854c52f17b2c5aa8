"""Simulate a federation: N leaves training concurrently against a BranchKey server,
each leaf its own `federated-training` flow run (visible in the UI under this one), and
the federation's side-by-side history published as artifacts while the rounds go by."""

from __future__ import annotations

import contextvars
import json
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import flow, get_run_logger
from prefect.exceptions import PrefectException

from bk_blocks import BranchKeyCredentials
from tasks import LeafSession

from .history import history_rows
from .observability import label_flow_run, publish_federation_artifacts
from .round import RoundResult
from .training import federated_training

# How often the federation artifacts are brought up to date while the leaves train, in seconds.
FEDERATION_REFRESH_S = 1.0


def leaf_credentials(credentials_dir: Path, host: str, transport: str) -> list[BranchKeyCredentials]:
    """One Block per credentials JSON in the directory (sorted by file name)."""
    paths = sorted(Path(credentials_dir).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no leaf credentials (*.json) in {credentials_dir}")
    return [BranchKeyCredentials.from_platform_json(path, host=host, notification_transport=transport)
            for path in paths]


@flow(name="federated-simulation")
def federated_simulation(
    host: str,
    credentials_dir: str,
    work_root: str,
    participant: str = "flows.examples.digits:DigitsSoftmax",
    participant_options: dict[str, Any] | None = None,
    rounds: int = 5,
    transport: Literal["websocket", "amqp"] = "websocket",
    amqp_host: str | None = None,
    aggregation_timeout_s: float = 600,
    update_options: dict[str, Any] | None = None,
) -> dict[str, list[RoundResult]]:
    """Run every leaf of `credentials_dir` for `rounds` rounds; leaf i gets `leaf_index=i, leaves=N`
    added to the participant options (for splitting a data set across leaves). `update_options`
    are `federated_training`'s update parameters for every leaf (`upload_precision`,
    `max_update_norm_ratio`, `dp_clip_norm`, `dp_noise_multiplier`, `dp_delta`, `dp_epsilon_budget`)."""
    logger = get_run_logger()
    blocks = leaf_credentials(Path(credentials_dir), host, transport)
    if amqp_host:
        blocks = [b.model_copy(update={"amqp_host": amqp_host}) for b in blocks]
    logger.info("simulating %d leaves for %d rounds over %s", len(blocks), rounds, transport)
    branch_id = blocks[0].branch_id
    with LeafSession(blocks[0]) as session:
        branch = session.branch_name
    label_flow_run(f"{branch}-{len(blocks)}-leaves-{rounds}-rounds",
                   ["branchkey", f"branch:{branch}", f"branch-id:{branch_id}"])

    work_dirs = {b.leaf_name: Path(work_root) / b.leaf_name for b in blocks}

    def train(index: int, block: BranchKeyCredentials) -> list[RoundResult]:
        options = {**(participant_options or {}), "leaf_index": index, "leaves": len(blocks)}
        return federated_training(block, participant, str(work_dirs[block.leaf_name]), rounds=rounds,
                                  participant_options=options, aggregation_timeout_s=aggregation_timeout_s,
                                  **(update_options or {}))

    with ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="leaf") as pool:
        futures = {b.leaf_name: pool.submit(contextvars.copy_context().run, train, i, b) for i, b in enumerate(blocks)}
        _publish_while_running(branch, work_dirs, list(futures.values()))
        results = {name: future.result() for name, future in futures.items()}
    for name, rounds_done in results.items():
        logger.info("%s: %s", name, json.dumps([(r.round, r.status, r.eval_metrics) for r in rounds_done]))
    return results


def _publish_while_running(branch: str, work_dirs: dict[str, Path], futures: list[Future]) -> None:
    """Republish the federation artifacts each time every leaf has recorded one more round,
    until every leaf is done or one failed (the others then end at their aggregation timeout).

    Once per federation round, not per leaf record: each publication is two writes to the
    Prefect server, whose SQLite database is already busy with every leaf's runs.
    """
    published: tuple[int, int] | None = None
    while True:
        done, running = wait(futures, timeout=FEDERATION_REFRESH_S, return_when=FIRST_EXCEPTION)
        histories = {name: history_rows(path) for name, path in work_dirs.items()}
        complete, recorded = min(map(len, histories.values())), sum(map(len, histories.values()))
        finished = not running or any(f.exception() for f in done)
        if published is None or complete > published[0] or (finished and recorded != published[1]):
            try:
                publish_federation_artifacts(branch, histories)
                published = (complete, recorded)
            except (httpx.HTTPError, PrefectException) as exc:
                get_run_logger().warning("could not publish the federation artifacts (retrying): %s", exc)
        if finished:
            return
