"""The global models a leaf promotes, registered in a real `mlflow server` (SQLite store, local
artifacts): versions with their round's facts, the alias, idempotency, and a registry that is down,
refusing or guarded by a password never holding a round back or leaking the secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.archive import read_aggregate, write_update
from prefect_branchkey.bk_dev.processes import free_port
from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_rows
from prefect_branchkey.flows.publishing.registry import (
    MARKER,
    MlflowRegistry,
    Registrar,
    RegistrySettings,
    stage_model,
)
from prefect_branchkey.flows.training import federated_training

from ..support.bkserver import BkServer, credentials_for
from ..support.mlflow_server import MlflowServer

DIGITS = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
ONE_LEAF = {"leaf_index": 0, "leaves": 1}
WARNINGS = "prefect_branchkey.flows.publishing.registry"


class ExportingDigits(DigitsSoftmax):
    """The digits participant with a framework-native export: its layers as JSON lists."""

    def export_model(self, model: Path, directory: Path) -> None:
        layers = read_aggregate(model)
        (directory / "weights.json").write_text(json.dumps([layer.tolist() for layer in layers]))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every flow here runs against the session's Prefect server."""


def registry_block(name: str, tracking_uri: str, **fields: object) -> str:
    MlflowRegistry(tracking_uri=tracking_uri, **fields).save(name, overwrite=True)  # type: ignore[arg-type]
    return name


@pytest.fixture
def leaf(server: BkServer) -> BranchKeyCredentials:
    """The one leaf of a federation on the test's bk-server, its branch `registry-digits`."""
    return credentials_for(server, server.federation(leaves=1, branch="registry-digits").leaves[0])


def train(leaf: BranchKeyCredentials, work_dir: Path, rounds: int, registry: str,
          participant: str = DIGITS) -> list[str]:
    """Train the leaf up to round `rounds`; the statuses of the rounds this run did."""
    results = federated_training(leaf, participant, str(work_dir), rounds=rounds, participant_options=ONE_LEAF,
                                 registry=registry)
    assert isinstance(results, list), results
    return [result.status for result in results]


def versions(mlflow: MlflowClient, name: str) -> list:  # type: ignore[type-arg]
    return sorted(mlflow.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_each_promoted_round_is_a_version_with_its_facts_and_the_alias_follows(
        leaf: BranchKeyCredentials, mlflow: MlflowClient, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    block = registry_block("registry-facts", mlflow_server.url, model_name="facts-digits")
    assert train(leaf, tmp_path / "leaf", 2, block) == ["completed", "completed"]
    rows = history_rows(tmp_path / "leaf")
    found = versions(mlflow, "facts-digits")
    assert [v.tags["branchkey.aggregation_id"] for v in found] == [row["aggregation_id"] for row in rows]
    latest, row = found[-1], rows[-1]
    assert latest.tags["branchkey.round"] == "2" and latest.tags["branchkey.branch_name"] == "registry-digits"
    assert latest.tags["branchkey.tree_id"] == row["tree_id"] and latest.tags["branchkey.updates_aggregated"] == "1"
    assert latest.tags["branchkey.prefect_flow_run_url"].endswith(f"/runs/flow-run/{row['flow_run_id']}")
    assert mlflow.get_model_version_by_alias("facts-digits", "champion").version == latest.version
    run = mlflow.get_run(latest.run_id)
    assert run.data.metrics["eval_accuracy"] == pytest.approx(row["eval_metrics"]["accuracy"])
    assert run.data.params["leaf"] == row["leaf_name"]
    assert [a.path for a in mlflow.list_artifacts(latest.run_id, "model")] == [f"model/{row['aggregation_id']}.npz"]


def test_a_rerun_never_registers_an_aggregation_twice(leaf: BranchKeyCredentials, mlflow: MlflowClient,
                                                      mlflow_server: MlflowServer, tmp_path: Path) -> None:
    block = registry_block("registry-rerun", mlflow_server.url, model_name="rerun-digits")
    work_dir = tmp_path / "leaf"
    train(leaf, work_dir, 2, block)
    before = [v.version for v in versions(mlflow, "rerun-digits")]
    (work_dir / MARKER).unlink()
    for row in history_rows(work_dir):
        stage_model(work_dir, row["aggregation_id"], work_dir / "models" / f"{row['aggregation_id']}.npz",
                    lambda model, directory: None)
    settings = RegistrySettings(mlflow_server.url, model_name="rerun-digits")
    assert Registrar("leaf", work_dir, settings).register_pending()
    assert [v.version for v in versions(mlflow, "rerun-digits")] == before
    assert mlflow.get_model_version_by_alias("rerun-digits", "champion").version == before[-1]


def test_a_round_not_promoted_is_not_registered_and_the_alias_stays(mlflow: MlflowClient,
                                                                    mlflow_server: MlflowServer,
                                                                    tmp_path: Path) -> None:
    for round_number, served in ((1, True), (2, False), (3, True)):
        aggregation_id = f"agg-{round_number}"
        model = write_update(tmp_path / f"{aggregation_id}.npz", 1.0, [np.full(3, round_number, np.float32)])
        append_record(tmp_path, RoundRecord(branch_id="b", leaf_id="l", leaf_name="leaf-1", run_number=1,
                                            round=round_number, status="completed", aggregation_id=aggregation_id,
                                            served=served, eval_metrics={"accuracy": 0.5}, branch_name="judged"))
        if served:
            stage_model(tmp_path, aggregation_id, model, lambda model, directory: None)
        registrar = Registrar("leaf-1", tmp_path, RegistrySettings(mlflow_server.url))
        assert registrar.register_pending()
        champion = mlflow.get_model_version_by_alias("judged", "champion")
        assert champion.tags["branchkey.round"] == ("1" if round_number < 3 else "3")
    assert [v.tags["branchkey.round"] for v in versions(mlflow, "judged")] == ["1", "3"]


def test_an_unreachable_registry_never_holds_a_round_back_and_is_caught_up_later(
        leaf: BranchKeyCredentials, mlflow: MlflowClient, mlflow_server: MlflowServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    block = registry_block("registry-down", f"http://127.0.0.1:{free_port()}", model_name="late-digits",
                           username="fl-site", password="pw-never-logged", token="tok-never-logged", timeout_s=2)
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    assert train(leaf, tmp_path / "leaf", 2, block) == ["completed", "completed"]
    warnings = [r for r in caplog.records if r.name == WARNINGS and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "round 1's global model" in message and "not registered in MLflow yet" in message
    assert "is unreachable: Connection refused" in message
    assert not any("never-logged" in r.getMessage() for r in caplog.records)
    assert versions(mlflow, "late-digits") == []
    registry_block("registry-down", mlflow_server.url, model_name="late-digits", username="fl-site",
                   password="pw-never-logged", token="tok-never-logged")
    assert train(leaf, tmp_path / "leaf", 3, block) == ["completed"]
    assert [v.tags["branchkey.round"] for v in versions(mlflow, "late-digits")] == ["1", "2", "3"]


def test_a_refused_model_name_is_one_clear_warning_and_the_round_completes(
        leaf: BranchKeyCredentials, mlflow_server: MlflowServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    block = registry_block("registry-refuses", mlflow_server.url, model_name="bad/name")
    caplog.set_level(logging.INFO, logger=WARNINGS)
    assert train(leaf, tmp_path / "leaf", 1, block) == ["completed"]
    [warning] = [r for r in caplog.records if r.name == WARNINGS and r.levelno == logging.WARNING]
    assert "INVALID_PARAMETER_VALUE: Invalid model name 'bad/name'" in warning.getMessage()


def test_the_participants_own_export_is_what_the_registry_holds(leaf: BranchKeyCredentials, mlflow: MlflowClient,
                                                                mlflow_server: MlflowServer, tmp_path: Path) -> None:
    block = registry_block("registry-export", mlflow_server.url, model_name="exported-digits")
    assert train(leaf, tmp_path / "leaf", 1, block, f"{__name__}:ExportingDigits") == ["completed"]
    [version] = versions(mlflow, "exported-digits")
    assert [a.path for a in mlflow.list_artifacts(version.run_id, "model")] == ["model/weights.json"]


def test_the_registry_blocks_secrets_stay_out_of_its_settings_repr() -> None:
    block = MlflowRegistry(tracking_uri="https://mlflow.example", username="u", password="pw-secret",
                           token="tok-secret")  # type: ignore[arg-type]
    assert "pw-secret" not in repr(block) and "tok-secret" not in repr(block)
    settings = block.settings()
    assert settings.password == "pw-secret" and "pw-secret" not in repr(settings) and "tok-secret" not in repr(settings)
