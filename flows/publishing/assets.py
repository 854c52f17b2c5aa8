"""The global model as a Prefect asset, with each leaf's update as its upstream asset.

Keys are derived from the tree and the branch (ids: names may change), so every leaf of a
branch materializes the same `branchkey://<tree>/<branch>/global-model` each round, naming
its own update (`.../leaves/<leaf>/update`) as the upstream asset: the asset's lineage shows,
round by round, which leaves' updates went into it. The events are the ones Prefect's
`@materialize` sends (`prefect.asset.materialization.succeeded`, resources built by Prefect's
own `AssetContext`), sent with the round's publication so no round waits for them; their ids
come from the leaf and the round, so a round published twice is one materialization.
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect.assets import Asset, AssetProperties
from prefect.context import AssetContext
from prefect.events import Event
from pydantic import ValidationError

from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.flows.leaf.history import RoundRecord

MATERIALIZED = "prefect.asset.materialization.succeeded"
MATERIALIZED_BY = "branchkey"
ASSET_NAMESPACE = uuid.UUID("0b7f6a52-2f4e-4d7c-9c61-5e0c2a9d8e31")


class AssetKeyError(BranchKeyError, ValueError):
    """An asset key Prefect refuses (a tree or branch id with characters keys cannot hold)."""


def global_model_asset(tree_id: str, branch_id: str, branch_name: str | None = None) -> Asset:
    """The branch's global model as an asset, named after the branch."""
    return _asset(f"branchkey://{tree_id}/{branch_id}/global-model", f"{branch_name or branch_id} global model",
                  "The federation's global model: each round's FedAvg aggregate, as the leaves downloaded it.")


def update_asset(tree_id: str, branch_id: str, leaf_id: str, leaf_name: str) -> Asset:
    """A leaf's update to the branch as an asset (its latest version is the latest round's upload)."""
    return _asset(f"branchkey://{tree_id}/{branch_id}/leaves/{leaf_id}/update", f"{leaf_name} update",
                  f"The model update leaf {leaf_name} uploads each round.")


def check_asset_keys(tree_id: str, branch_id: str, leaf_id: str, leaf_name: str) -> None:
    """Refuse, before any round, a leaf whose asset keys Prefect would refuse (an id with a space
    or a control character): its rounds' materializations could never be published."""
    global_model_asset(tree_id, branch_id)
    update_asset(tree_id, branch_id, leaf_id, leaf_name)


def _asset(key: str, name: str, description: str) -> Asset:
    try:
        return Asset(key=key, properties=AssetProperties(name=name, description=description))
    except ValidationError as exc:
        raise AssetKeyError(f"asset key {key!r} is refused by Prefect ({exc.errors()[0]['msg']}): check the "
                            "tree and branch ids of the leaf's credentials") from None


def model_asset_events(record: RoundRecord) -> list[Event]:
    """For a completed round: the leaf's update materialized by its flow run, then the global
    model materialized from it, each carrying the round's facts as metadata."""
    if record.status != "completed" or not record.tree_id:
        return []
    update = update_asset(record.tree_id, record.branch_id, record.leaf_id, record.leaf_name)
    model = global_model_asset(record.tree_id, record.branch_id, record.branch_name)
    run = [{"prefect.resource.id": f"prefect.flow-run.{record.flow_run_id}", "prefect.resource.role": "flow-run"}
           ] if record.flow_run_id else []
    by = [AssetContext.related_materialized_by(MATERIALIZED_BY)]
    return [
        _event(record, "update", update, run + by, {
            "run_number": record.run_number, "round": record.round, "file_id": record.file_id,
            "weighting": record.weighting, "bytes_up": record.bytes_up, "update_norm": record.update_norm,
            "upload_precision": record.upload_precision, "dp_epsilon": record.dp_epsilon}),
        _event(record, "global-model", model, [AssetContext.asset_as_related(update), *run, *by], {
            "run_number": record.run_number, "round": record.round, "aggregation_id": record.aggregation_id,
            "leaf": record.leaf_name, "eval_metrics": record.eval_metrics, "bytes": record.bytes_down,
            "best_round": record.best_round, "served": record.served}),
    ]


def _event(record: RoundRecord, what: str, asset: Asset, related: list[dict[str, str]],
           payload: dict[str, Any]) -> Event:
    event_id = uuid.uuid5(ASSET_NAMESPACE, f"{record.leaf_id}/{record.run_number}/{record.round}/{what}")
    return Event(event=MATERIALIZED, resource=AssetContext.asset_as_resource(asset), related=related,
                 payload=payload, id=event_id, **({"occurred": record.finished_at} if record.finished_at else {}))
