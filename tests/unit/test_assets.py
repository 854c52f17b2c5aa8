"""The global model as a Prefect asset: keys, lineage, and what a round materializes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from prefect_branchkey.deployments.edge import EdgeSetupError, LeafSpec, leaf_block
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_files
from prefect_branchkey.flows.publishing.assets import MATERIALIZED, AssetKeyError, check_asset_keys, model_asset_events

TREE, BRANCH, LEAF = "tree-1", "branch-1", "leaf-a"


def completed(round_number: int = 3, status: str = "completed") -> RoundRecord:
    return RoundRecord(branch_id=BRANCH, leaf_id=LEAF, leaf_name="site-a", run_number=1, round=round_number,
                       status=status, aggregation_id=f"agg-{round_number}", tree_id=TREE, branch_name="cardiology",
                       eval_metrics={"accuracy": 0.9}, flow_run_id="11111111-2222-3333-4444-555555555555",
                       finished_at=datetime(2026, 11, 30, tzinfo=UTC))


def test_a_round_materializes_the_global_model_from_the_leafs_update() -> None:
    update, model = model_asset_events(completed())
    assert update.event == model.event == MATERIALIZED
    assert model.resource.id == f"branchkey://{TREE}/{BRANCH}/global-model"
    assert model.resource["prefect.resource.name"] == "cardiology global model"
    upstream = [r.id for r in model.related if r.role == "asset"]
    assert upstream == [update.resource.id] == [f"branchkey://{TREE}/{BRANCH}/leaves/{LEAF}/update"]
    assert model.payload["aggregation_id"] == "agg-3" and model.payload["eval_metrics"] == {"accuracy": 0.9}


def test_a_round_published_twice_is_one_materialization() -> None:
    assert [e.id for e in model_asset_events(completed())] == [e.id for e in model_asset_events(completed())]


def test_a_round_that_did_not_complete_materializes_nothing() -> None:
    assert model_asset_events(completed(status="resynced")) == []


def test_an_asset_key_prefect_refuses_is_refused_naming_it() -> None:
    with pytest.raises(AssetKeyError, match=r"asset key 'branchkey://my tree/branch-1/global-model' is refused"):
        check_asset_keys("my tree", BRANCH, LEAF, "site-a")


def test_edge_setup_refuses_credentials_whose_asset_keys_prefect_refuses(tmp_path: Path) -> None:
    path = tmp_path / "leaf-1.json"
    path.write_text(json.dumps({"id": LEAF, "name": "site-a", "session_token": "x" * 32, "tree_id": "my tree",
                                "branch_id": BRANCH, "owner_id": "owner"}))
    with pytest.raises(EdgeSetupError, match=r"cannot read leaf credentials .*asset key"):
        leaf_block(LeafSpec.parse(f"leaf-1={path}"), "http://127.0.0.1:1")


def test_a_drift_check_row_sorts_after_its_rounds_row(tmp_path: Path) -> None:
    append_record(tmp_path, completed(status="evaluated"))
    append_record(tmp_path, completed())
    append_record(tmp_path, completed(round_number=4))
    names = [p.name for p in history_files(tmp_path)]
    assert ["~evaluated-" in n for n in names] == [False, True, False]
