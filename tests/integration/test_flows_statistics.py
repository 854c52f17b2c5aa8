"""The federated-statistics flows against a real bk_server and Prefect server: three digits leaves
reduce their pixels, the federation's per-feature statistics come back, and each leaf records and
publishes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_server.cli import write_credentials
from prefect_branchkey.flows.examples.digits import DigitsSoftmax
from prefect_branchkey.flows.federation.leaves import leaf_credentials
from prefect_branchkey.flows.leaf.audit import read_entries, verify_trail
from prefect_branchkey.flows.leaf.history import ANALYTICS, history_rows
from prefect_branchkey.flows.participant import Participant, ParticipantError, TrainResult
from prefect_branchkey.flows.publishing.observability import artifact_key
from prefect_branchkey.flows.statistics import (
    StatisticsResult,
    federated_statistics,
    federation_statistics,
    load_columns,
)

from ..support.bkserver import BkServer
from ..support.flow_helpers import artifacts


@pytest.fixture(scope="module", params=["websocket", "amqp"])
def statistics_round(request: pytest.FixtureRequest, prefect_api: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[BkServer, Path, dict[str, StatisticsResult]]]:
    """One statistics round of three digits leaves per transport (the combined result is announced
    like an aggregate on both); return server, work root, results."""
    if request.param == "amqp":
        request.getfixturevalue("rabbitmq")
    root = tmp_path_factory.mktemp(f"statistics-{request.param}")
    server = BkServer(root / "data", amqp=request.param == "amqp").start()
    try:
        federation = server.federation(leaves=3)
        write_credentials(root / "creds", federation.leaves)
        yield server, root / "leaves", federation_statistics(server.url, str(root / "creds"), str(root / "leaves"),
                                                             transport=request.param, amqp_host="127.0.0.1",
                                                             timeout_s=120)
    finally:
        server.stop()
        if server.amqp:
            server.cleanup_broker()


def test_every_leaf_gets_the_same_combined_statistics(statistics_round) -> None:
    _, _, results = statistics_round
    assert len({r.aggregation_id for r in results.values()}) == 1
    assert {(r.run_number, r.round) for r in results.values()} == {(1, 1)}
    tables = [r.table for r in results.values()]
    assert len(tables[0]) == 64 and [row["column"] for row in tables[0]][:2] == ["pixel_00", "pixel_01"]
    federation_columns = ("n", "completeness", "mean", "variance", "std", "min", "max")
    assert all([{k: row[k] for k in federation_columns} for row in t] ==
               [{k: row[k] for k in federation_columns} for row in tables[0]] for t in tables)


def test_combined_statistics_are_the_pooled_training_pixels(statistics_round) -> None:
    _, _, results = statistics_round
    pooled = np.concatenate([DigitsSoftmax(leaf_index=i, leaves=3).x_train.astype(np.float64) for i in range(3)])
    table = next(iter(results.values())).table
    for index in (0, 20, 36):
        row = table[index]
        assert row["n"] == pooled.shape[0] and row["completeness"] == 1.0
        np.testing.assert_allclose(row["mean"], pooled[:, index].mean(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(row["std"], pooled[:, index].std(), rtol=1e-9, atol=1e-12)


def test_each_leaf_sees_its_own_values_beside_the_federations(statistics_round) -> None:
    _, _, results = statistics_round
    for index, result in enumerate(results.values()):
        own = DigitsSoftmax(leaf_index=index, leaves=3).x_train[:, 36].astype(np.float64)
        row = result.table[36]
        assert row["site n"] == own.size and row["site n"] < row["n"]
        np.testing.assert_allclose(row["site mean"], own.mean(), rtol=1e-12)


def test_statistics_round_is_an_analytics_row_of_the_history(statistics_round) -> None:
    _, leaves, results = statistics_round
    for leaf_dir in sorted(leaves.iterdir()):
        assert history_rows(leaf_dir) == []
        [row] = history_rows(leaf_dir, kinds=(ANALYTICS,))
        assert (row["round_kind"], row["status"], row["run_number"], row["round"]) == (ANALYTICS, "completed", 1, 1)
        assert row["aggregation_id"] == results[leaf_dir.name].aggregation_id
        assert "pixel_36.mean" in row["eval_metrics"] and "pixel_36.mean" in row["train_metrics"]


def test_the_audit_trail_records_the_statistics_sent_and_the_result_received(statistics_round) -> None:
    server, leaves, results = statistics_round
    for leaf_dir in sorted(leaves.iterdir()):
        sending, confirmed, received = read_entries(leaf_dir)
        [row] = history_rows(leaf_dir, kinds=(ANALYTICS,))
        assert (sending["kind"], sending["step"], confirmed["step"]) == ("statistics", "sending", "confirmed")
        assert sending["facts"]["destination"] == server.url and sending["facts"]["bytes"] == row["bytes_up"]
        fields = [field["name"] for field in sending["facts"]["fields"]]
        assert "pixel_36" in " ".join(fields) and confirmed["facts"]["file_id"] == row["file_id"]
        assert (received["kind"], received["key"]) == ("download", results[leaf_dir.name].aggregation_id)
        assert row["audit_head"] == received["hash"] and verify_trail(leaf_dir).intact


def test_statistics_table_artifact_is_published(statistics_round, prefect_api: str) -> None:
    _, _, results = statistics_round
    leaf = next(iter(results))
    found = artifacts(prefect_api, artifact_key("statistics", leaf))
    assert found and found[0]["type"] == "table" and "pixel_00" in str(found[0]["data"])


def site_columns(size: int = 3) -> dict[str, np.ndarray]:
    """A statistics source named by import path in the tests."""
    return {"x": np.arange(size, dtype=np.float64)}


class NoStatistics(Participant):
    """A participant that only trains (its statistics() is the default: no columns)."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(1.0, [np.ones(1)])


def test_statistics_from_a_callable_by_import_path() -> None:
    columns = load_columns(None, {"size": 4}, "tests.integration.test_flows_statistics:site_columns")
    assert list(columns) == ["x"] and columns["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_participant_without_statistics_is_refused() -> None:
    with pytest.raises(ParticipantError, match="returned no columns"):
        load_columns("tests.integration.test_flows_statistics:NoStatistics", None, None)


def test_statistics_callable_that_is_not_importable_is_refused() -> None:
    with pytest.raises(ParticipantError, match="cannot import statistics callable 'nowhere:columns'"):
        load_columns(None, None, "nowhere:columns")


def test_rerun_after_the_round_counts_once(statistics_round) -> None:
    server, leaves, results = statistics_round
    block = leaf_credentials(leaves.parent / "creds", server.url, "websocket")[0]
    again = federated_statistics(block, str(leaves / block.leaf_name),
                                 "prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                                 {"leaf_index": 0, "leaves": 3}, timeout_s=30)
    assert again.aggregation_id == results[block.leaf_name].aggregation_id
    rounds = server.status(server.federations[0].branch_id)["rounds"]
    assert [(r["round"], r["updates"]) for r in rounds] == [(1, 3), (2, 0)]
    assert len(history_rows(leaves / block.leaf_name, kinds=(ANALYTICS,))) == 1
