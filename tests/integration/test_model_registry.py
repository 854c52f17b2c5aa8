"""The global models a leaf promotes, registered in a real `mlflow server` (SQLite store, local
artifacts; one behind MLflow's basic auth for the Block's password): versions with their round's
facts, the alias, idempotency, and a registry that is down, refusing or given the wrong password
never holding a round back or leaking the secret."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.bk_blocks.archive import read_aggregate, write_update
from prefect_branchkey.bk_dev.processes import free_port
from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.leaf.audit import read_entries
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_rows
from prefect_branchkey.flows.publishing.registry import (
    MARKER,
    MlflowRegistry,
    Registrar,
    RegistrySettings,
    identity,
    stage_model,
)
from prefect_branchkey.flows.training import federated_training

from ..support.bkserver import BkServer, credentials_for
from ..support.mlflow_server import ADMIN_PASSWORD, ADMIN_USER, MlflowServer

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


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A second server, behind MLflow's basic auth."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), auth=True).start()
    try:
        yield server
    finally:
        server.stop()


class AdminClient:
    """The test's own view of the registry: an MlflowClient whose calls (only) carry the admin's
    credentials in MLflow's environment variables, so a leaf's registration gets in only with its Block's."""

    def __init__(self, url: str) -> None:
        self._client = MlflowClient(tracking_uri=url, registry_uri=url)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def as_admin(*args: Any, **kwargs: Any) -> Any:
            os.environ |= {"MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
            try:
                return method(*args, **kwargs)
            finally:
                for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    os.environ.pop(variable, None)

        return as_admin


@pytest.fixture
def mlflow(mlflow_server: MlflowServer) -> AdminClient:
    return AdminClient(mlflow_server.url)


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every flow here runs against the session's Prefect server."""


def registry_block(name: str, tracking_uri: str, **fields: object) -> str:
    """Save an MlflowRegistry Block."""
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


def versions(mlflow: AdminClient, name: str) -> list[Any]:
    return sorted(mlflow.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_each_promoted_round_is_a_version_with_its_facts_and_the_alias_follows(
        leaf: BranchKeyCredentials, mlflow: AdminClient, mlflow_server: MlflowServer, tmp_path: Path) -> None:
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
    registrations = [e for e in read_entries(tmp_path / "leaf") if e["kind"] == "registration"]
    assert [e["step"] for e in registrations] == ["sending", "confirmed"] * 2
    sent = registrations[2]["facts"]
    assert sent["destination"] == mlflow_server.url and sent["model"] == "facts-digits"
    assert [f["name"] for f in sent["files"]] == [f"{row['aggregation_id']}.npz"]
    assert registrations[3]["facts"]["version"] == latest.version


def test_a_rerun_never_registers_an_aggregation_twice(leaf: BranchKeyCredentials, mlflow: AdminClient,
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


def test_a_round_not_promoted_is_not_registered_and_the_alias_stays(mlflow: AdminClient,
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
        leaf: BranchKeyCredentials, mlflow: AdminClient, mlflow_server: MlflowServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    block = registry_block("registry-down", f"http://127.0.0.1:{free_port()}", model_name="late-digits",
                           password="pw-never-logged", timeout_s=2)
    caplog.set_level(logging.DEBUG, logger=WARNINGS)
    assert train(leaf, tmp_path / "leaf", 2, block) == ["completed", "completed"]
    warnings = [r.getMessage() for r in caplog.records if r.name == WARNINGS and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "round 1's global model" in warnings[0] and "is unreachable: Connection refused" in warnings[0]
    assert "round 2's global model" in warnings[1] and "waits behind round 1's" in warnings[1]
    assert not any("never-logged" in r.getMessage() for r in caplog.records)
    assert "pw-never-logged" not in os.environ.values()
    assert versions(mlflow, "late-digits") == []
    registry_block("registry-down", mlflow_server.url, model_name="late-digits")
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


def test_the_participants_own_export_is_what_the_registry_holds(leaf: BranchKeyCredentials, mlflow: AdminClient,
                                                                mlflow_server: MlflowServer, tmp_path: Path) -> None:
    block = registry_block("registry-export", mlflow_server.url, model_name="exported-digits")
    assert train(leaf, tmp_path / "leaf", 1, block, f"{__name__}:ExportingDigits") == ["completed"]
    [version] = versions(mlflow, "exported-digits")
    assert [a.path for a in mlflow.list_artifacts(version.run_id, "model")] == ["model/weights.json"]


def test_a_password_protected_registry_takes_the_blocks_credentials_and_only_them(
        leaf: BranchKeyCredentials, guarded_server: MlflowServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = registry_block("registry-wrong-password", guarded_server.url, model_name="guarded-digits",
                           username=ADMIN_USER, password="wrong-pw-never-logged")
    assert train(leaf, tmp_path / "leaf", 1, wrong) == ["completed"]
    [warning] = [r.getMessage() for r in caplog.records if r.name == WARNINGS and r.levelno == logging.WARNING]
    assert "round 1's global model" in warning and "401" in warning, warning
    right = registry_block("registry-right-password", guarded_server.url, model_name="guarded-digits",
                           username=ADMIN_USER, password=ADMIN_PASSWORD)
    assert train(leaf, tmp_path / "leaf", 2, right) == ["completed"]
    registered = versions(AdminClient(guarded_server.url), "guarded-digits")
    assert [v.tags["branchkey.round"] for v in registered] == ["1", "2"], "round 1 caught up once let in"
    assert not any(secret in r.getMessage() for r in caplog.records
                   for secret in ("wrong-pw-never-logged", ADMIN_PASSWORD))
    assert not {"wrong-pw-never-logged", ADMIN_PASSWORD} & set(os.environ.values())


def test_a_run_a_killed_registration_left_unfinished_is_not_the_versions_source(
        mlflow: AdminClient, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    model = write_update(tmp_path / "agg-9.npz", 1.0, [np.ones(3, np.float32)])
    append_record(tmp_path, RoundRecord(branch_id="b", leaf_id="l", leaf_name="leaf-1", run_number=1, round=9,
                                        status="completed", aggregation_id="agg-9", served=True, branch_name="killed"))
    stage_model(tmp_path, "agg-9", model, lambda model, directory: None)
    experiment = mlflow.create_experiment("branchkey-killed")
    half_made = mlflow.create_run(experiment, tags={"branchkey.identity": identity("agg-9", "leaf-1")})
    assert Registrar("leaf-1", tmp_path, RegistrySettings(mlflow_server.url)).register_pending()
    [version] = versions(mlflow, "killed")
    assert version.run_id != half_made.info.run_id
    assert mlflow.get_run(half_made.info.run_id).info.status == "FAILED"
    assert [a.path for a in mlflow.list_artifacts(version.run_id, "model")] == ["model/agg-9.npz"]


def test_the_registry_blocks_secrets_stay_out_of_its_settings_repr() -> None:
    block = MlflowRegistry(tracking_uri="https://mlflow.example", username="u", password="pw-secret",
                           token="tok-secret")  # type: ignore[arg-type]
    assert "pw-secret" not in repr(block) and "tok-secret" not in repr(block)
    settings = block.settings()
    assert settings.password == "pw-secret" and "pw-secret" not in repr(settings) and "tok-secret" not in repr(settings)
