"""One leaf on one machine without a work pool or worker: `bk edge serve`.

`serve` keeps a process that both registers the leaf's two deployments (continuous
rounds on an interval, retraining on a cron) and runs their flow runs itself, with the
same guarantee as on a worker: a run that would overlap another run of the leaf is
cancelled (each deployment's CANCEL_NEW limit, and the flows' work-dir lock across the two).
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from prefect_branchkey.flows.round import federated_round
from prefect_branchkey.flows.training import federated_training


def serve_leaf(leaf: str, participant: str, work_dir: str, participant_options: dict[str, Any] | None = None,
               interval_s: float = 900, cron: str | None = "0 2 * * *", rounds_per_run: int = 10) -> None:
    """Serve `<leaf>-rounds` (a round every `interval_s`) and, if `cron` is given, `<leaf>-nightly`."""
    parameters = {"credentials": leaf, "participant": participant, "work_dir": work_dir,
                  "participant_options": participant_options or {}}
    tags = ["branchkey", f"leaf:{leaf}"]
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    # Module entrypoints (`prefect_branchkey.flows.round:federated_round`), as in prefect.yaml: a file path would
    # load flows/round.py as a top-level module, a second copy of the package's classes.
    common: dict[str, Any] = {"tags": tags, "concurrency_limit": one_at_a_time,
                              "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [federated_round.to_deployment(
        name=f"{leaf}-rounds", interval=interval_s, parameters=parameters,
        description=f"Continuous federated rounds of {leaf}", **common)]
    if cron:
        deployments.append(federated_training.to_deployment(
            name=f"{leaf}-nightly", cron=cron,
            parameters={**parameters, "rounds": None, "rounds_per_run": rounds_per_run},
            description=f"Retraining of {leaf}, {rounds_per_run} rounds per run", **common))
    serve(*deployments)  # type: ignore[arg-type]  # to_deployment is sync_compatible: a RunnerDeployment here
