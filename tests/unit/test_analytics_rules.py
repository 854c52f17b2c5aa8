"""The platform's rules for statistics payloads, checked in-process: what it combines, how, and
every refusal by its exact reason (the round stays intact after each)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from prefect_branchkey.bk_blocks.analytics import read_fields, reduce_column, summarize, write_fields, write_statistics
from prefect_branchkey.bk_blocks.archive import PAYLOAD_KIND_KEY, write_update
from prefect_branchkey.bk_server.app import create_app
from prefect_branchkey.bk_server.settings import ServerSettings

from .test_api_rules import ADMIN, Platform


class Statistics(Platform):
    """The in-process platform, with statistics payloads and the branch's field operations."""

    def send(self, leaf: int, path: Path) -> Any:
        data = {"data": json.dumps({"leaf_name": self.leaves[leaf]["name"], "metadata": "{}"})}
        files = {"file": (path.name, io.BytesIO(path.read_bytes()), "application/octet-stream")}
        return self.client.post("/api/v1/file/upload", data=data, files=files, headers=self.headers(leaf))

    def columns(self, leaf: int, **columns: Any) -> Any:
        return self.send(leaf, write_statistics(self.tmp_path / f"stats-{leaf}.npz", columns))

    def fields(self, leaf: int, **fields: Any) -> Any:
        return self.send(leaf, write_fields(self.tmp_path / f"fields-{leaf}.npz", fields))

    def raw(self, leaf: int, **arrays: Any) -> Any:
        path = self.tmp_path / f"raw-{leaf}.npz"
        np.savez(path, **{PAYLOAD_KIND_KEY: np.array("federated_analytics")}, **arrays)
        return self.send(leaf, path)

    def assign(self, fields: Any) -> Any:
        return self.client.put(f"/admin/v1/branches/{self.federation['branch_id']}/fields", json={"fields": fields},
                               headers=ADMIN)

    def settled(self, index: int = 0) -> dict[str, Any]:
        """The run's round `index` once its aggregation finished (it runs on the platform's worker thread)."""
        deadline = time.monotonic() + 10
        while (round_ := self.rounds()[index])["status"] == "aggregating" and time.monotonic() < deadline:
            time.sleep(0.02)
        return round_

    def combined(self, aggregation_id: str) -> dict[str, np.ndarray]:
        link = self.client.get(f"/api/v1/file/download/{aggregation_id}", headers=self.headers())
        url = link.json()["data"]["download_url"].split("testserver", 1)[-1]
        path = self.tmp_path / f"{aggregation_id}.npz"
        path.write_bytes(self.client.get(url).content)
        return read_fields(path, combined=True)


@pytest.fixture
def stats(tmp_path: Path) -> Iterator[Statistics]:
    """Two leaves, both needed to close a round."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data"), admin_token="admin-token")
    with TestClient(app) as client:
        yield Statistics(client, 2, tmp_path)


def refusal(reply: Any) -> tuple[int, str, str]:
    body = reply.json()
    return reply.status_code, body.get("code", ""), body["error"]


def test_bundles_combine_to_the_pooled_statistics(stats: Statistics) -> None:
    a, b = np.array([10.0, 10.0, 10.0, np.nan]), np.array([90.0, 90.0, 90.0])
    assert stats.columns(0, age=a).status_code == 201
    assert stats.columns(1, age=b).status_code == 201
    round_ = stats.settled()
    assert round_["status"] == "aggregated"
    summary = summarize(stats.combined(round_["aggregation_id"]), "age")
    assert (summary.n, summary.nan, summary.mean, summary.variance, summary.min, summary.max) == \
        (6, 1, 50.0, 1600.0, 10.0, 90.0)


def test_combined_result_keeps_the_bundle_dtypes(stats: Statistics) -> None:
    stats.columns(0, age=[1, 2])
    stats.columns(1, age=[3.5])
    fields = stats.combined(stats.settled()["aggregation_id"])
    assert fields["age_n"].dtype == np.int64 and fields["age_n"].tolist() == [3]
    assert fields["age_sumsq"].dtype == np.float64 and fields["age_sumsq"].tolist() == [1 + 4 + 3.5 ** 2]


def test_named_fields_combine_by_their_assigned_operations(stats: Statistics) -> None:
    assert stats.assign({"cases": "sum", "spacing": {"op": "mean", "weight": "cases"}, "lo": "min", "hi": "max",
                         "site_kind": "must_match"}).status_code == 200
    stats.fields(0, cases=10, spacing=[1.0, 2.0], lo=[3, 1], hi=[3, 1], site_kind="hospital")
    stats.fields(1, cases=30, spacing=[2.0, 4.0], lo=[2, 2], hi=[2, 2], site_kind="hospital")
    fields = stats.combined(stats.settled()["aggregation_id"])
    assert fields["cases"].tolist() == [40] and fields["spacing"].tolist() == [1.75, 3.5]
    assert fields["lo"].tolist() == [2, 1] and fields["hi"].tolist() == [3, 2]
    assert fields["site_kind"].tolist() == ["hospital"]


def test_analytics_upload_refused_when_field_missing(stats: Statistics) -> None:
    stats.assign({"cases": "sum"})
    reply = stats.columns(0, age=[1.0])
    assert refusal(reply)[:2] == (422, "field_missing") and "field 'cases' is missing" in refusal(reply)[2]


def test_analytics_upload_refused_when_field_missing_from_the_runs_fields(stats: Statistics) -> None:
    stats.columns(0, age=[1.0], bmi=[20.0])
    reply = stats.columns(1, age=[2.0])
    assert refusal(reply)[:2] == (422, "field_missing") and "field 'bmi_n' is missing" in refusal(reply)[2]
    assert stats.rounds()[0]["updates"] == 1


def test_analytics_upload_refused_when_field_unassigned(stats: Statistics) -> None:
    reply = stats.fields(0, cases=3)
    assert refusal(reply)[:2] == (422, "unassigned_field") and "field 'cases' has no operation" in refusal(reply)[2]
    assert stats.rounds()[0]["updates"] == 0


def test_analytics_upload_refused_when_field_not_among_the_runs(stats: Statistics) -> None:
    stats.columns(0, age=[1.0])
    reply = stats.columns(1, age=[1.0], bmi=[2.0])
    assert refusal(reply)[:2] == (422, "unexpected_field") and "field 'bmi_n'" in refusal(reply)[2]


def test_analytics_upload_refused_when_dtype_differs_from_the_runs(stats: Statistics) -> None:
    stats.assign({"cases": "sum"})
    stats.fields(0, cases=np.array([3], dtype=np.int64))
    reply = stats.fields(1, cases=np.array([3.0]))
    assert refusal(reply)[:2] == (422, "dtype_mismatch")
    assert "field 'cases' is float64 but this run's payloads have int64" in refusal(reply)[2]
    assert stats.rounds()[0]["updates"] == 1


def test_analytics_upload_refused_when_shape_differs_from_the_runs(stats: Statistics) -> None:
    stats.assign({"spacing": "max"})
    stats.fields(0, spacing=[1.0, 2.0])
    reply = stats.fields(1, spacing=[1.0, 2.0, 3.0])
    assert refusal(reply)[:2] == (422, "shape_mismatch") and "field 'spacing' has shape (3,)" in refusal(reply)[2]


def bundle(name: str = "age", **override: Any) -> dict[str, np.ndarray]:
    return reduce_column(name, [1.0, 2.0]) | override


def test_bundle_count_of_the_wrong_dtype_refused(stats: Statistics) -> None:
    reply = stats.raw(0, **bundle(age_n=np.array([2.0])))
    assert refusal(reply)[:2] == (422, "dtype_mismatch")
    assert "field 'age_n' is float64, but a bundle's '_n' is int64" in refusal(reply)[2]


def test_bundle_missing_a_suffix_refused_naming_it(stats: Statistics) -> None:
    fields = bundle()
    del fields["age_sumsq"]
    reply = stats.raw(0, **fields)
    assert refusal(reply)[:2] == (422, "bundle_incomplete") and "field 'age_sumsq' is missing" in refusal(reply)[2]


def test_two_dimensional_bundle_entry_refused(stats: Statistics) -> None:
    reply = stats.raw(0, **bundle(age_sum=np.ones((2, 2))))
    assert refusal(reply)[:2] == (422, "shape_mismatch") and "field 'age_sum' has shape (2, 2)" in refusal(reply)[2]


def test_object_array_field_refused(stats: Statistics) -> None:
    reply = stats.raw(0, **bundle(), notes=np.array([{"a": 1}], dtype=object))
    assert reply.status_code == 422 and "'notes' is an object array" in reply.json()["error"]
    assert stats.rounds()[0]["updates"] == 0


def test_zero_dimensional_field_refused(stats: Statistics) -> None:
    reply = stats.raw(0, **bundle(age_min=np.float64(1.0)))
    assert reply.status_code == 422 and "field 'age_min' is 0-d" in reply.json()["error"]


def test_string_field_with_a_numeric_combiner_refused(stats: Statistics) -> None:
    stats.assign({"site": "sum"})
    reply = stats.fields(0, site="north")
    assert refusal(reply)[:2] == (422, "operation_dtype")
    assert "field 'site' holds string values, which 'sum' cannot combine" in refusal(reply)[2]


def test_non_finite_bundle_value_refused(stats: Statistics) -> None:
    reply = stats.raw(0, **bundle(age_sum=np.array([np.inf])))
    assert refusal(reply)[:2] == (422, "non_finite") and "field 'age_sum'" in refusal(reply)[2]


def test_must_match_field_that_differs_refused(stats: Statistics) -> None:
    stats.assign({"site_kind": "must_match"})
    stats.fields(0, site_kind="hospital")
    reply = stats.fields(1, site_kind="clinic")
    assert refusal(reply)[:2] == (422, "must_match") and "field 'site_kind'" in refusal(reply)[2]
    assert stats.rounds()[0]["updates"] == 1


def test_analytics_payload_refused_in_a_learning_round(stats: Statistics) -> None:
    stats.upload(0)
    reply = stats.columns(1, age=[1.0])
    assert refusal(reply)[:2] == (422, "payload_kind_mismatch")
    assert "this round already holds federated_learning payloads" in refusal(reply)[2]
    assert stats.rounds()[0]["updates"] == 1


def test_learning_update_refused_in_an_analytics_round(stats: Statistics) -> None:
    stats.columns(0, age=[1.0])
    reply = stats.upload(1)
    assert refusal(reply)[:2] == (422, "payload_kind_mismatch")
    assert "a federated_learning payload cannot join it" in refusal(reply)[2]


def test_learning_round_after_an_analytics_round_takes_its_own_layers(stats: Statistics, tmp_path: Path) -> None:
    stats.columns(0, age=[1.0])
    stats.columns(1, age=[2.0])
    assert stats.upload(0).status_code == 201 and stats.upload(1).status_code == 201
    assert [stats.settled(i)["status"] for i in (0, 1)] == ["aggregated", "aggregated"]


def test_latest_aggregation_names_models_only(stats: Statistics) -> None:
    stats.columns(0, age=[1.0])
    stats.columns(1, age=[2.0])
    assert stats.settled()["status"] == "aggregated" and stats.run_details()["latest_aggregation"] is None


def test_branch_config_reports_both_payload_kinds_and_the_field_operations(stats: Statistics) -> None:
    stats.assign({"cases": "sum"})
    reply = stats.client.get(f"/api/v1/config/branch/{stats.federation['branch_id']}", headers=stats.headers())
    service = reply.json()["data"]["service"]
    assert service["payload_kinds"] == ["federated_learning", "federated_analytics"]
    assert service["analytics"]["field_operations"] == {"cases": {"op": "sum"}}
    assert service["analytics"]["bundle_combiners"]["sumsq"] == "sum"


@pytest.mark.parametrize("fields, message", [
    ({"x": "median"}, "operation must be one of sum, min, max, mean, must_match"),
    ({"x": "mean"}, "'mean' needs a 'weight'"),
    ({"x": {"op": "mean", "weight": "n"}}, "weighted by 'n', which has no operation of its own"),
    ({"layer_0": "sum"}, "'layer_0' is reserved for model layers"),
])
def test_unusable_field_operations_refused(stats: Statistics, fields: Any, message: str) -> None:
    reply = stats.assign(fields)
    assert reply.status_code == 400 and message in reply.json()["error"]


def test_learning_upload_still_works_with_the_new_columns(stats: Statistics, tmp_path: Path) -> None:
    path = write_update(tmp_path / "u.npz", 1.0, [np.ones(3, np.float32)])
    assert stats.send(0, path).status_code == 201


def test_operation_reassigned_mid_run_refused_until_a_new_run(stats: Statistics) -> None:
    stats.assign({"cases": "sum"})
    stats.fields(0, cases=3)
    stats.fields(1, cases=4)
    stats.assign({"cases": "max"})
    reply = stats.fields(0, cases=5)
    assert refusal(reply)[:2] == (422, "operation_changed")
    assert "field 'cases' would combine by 'max' but this run combines it by 'sum'" in refusal(reply)[2]
    stats.run("stop")
    stats.run("start")
    assert stats.fields(0, cases=5).status_code == 201 and stats.fields(1, cases=2).status_code == 201
    assert stats.combined(stats.settled(2)["aggregation_id"])["cases"].tolist() == [5]

