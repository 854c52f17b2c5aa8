"""What a registration says when MLflow does not take it, and what a version is tagged with."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from prefect_branchkey.flows.publishing.registry import RegistrySettings, cause, version_tags

URI = "http://mlflow.example:5000"
ROW = {"aggregation_id": "agg-7", "leaf_name": "digits-leaf-1", "branch_id": "b-1", "branch_name": "digits",
       "tree_id": "t-1", "run_number": 1, "round": 7, "updates_aggregated": 3, "upload_precision": "float16",
       "clip_norm": None, "noise_multiplier": None, "dp_delta": None, "dp_epsilon": None,
       "primary_metric": "accuracy", "flow_run_id": None}


def test_a_registry_that_refuses_connections_is_named_unreachable_with_the_sockets_reason() -> None:
    exc = MlflowException("API request to http://mlflow.example:5000/api/2.0/mlflow/model-versions/search failed "
                          "with exception HTTPConnectionPool(host='mlflow.example', port=5000): Max retries exceeded "
                          "with url: /api/... (Caused by NewConnectionError(\"HTTPConnection(host='mlflow.example', "
                          "port=5000): Failed to establish a new connection: [Errno 111] Connection refused\"))")
    assert cause(exc, URI) == f"MLflow at {URI} is unreachable: Connection refused"


def test_a_registry_that_does_not_answer_in_time_is_named_unreachable() -> None:
    exc = MlflowException("API request to ... failed with exception HTTPConnectionPool(host='mlflow.example', "
                          "port=5000): Read timed out. (read timeout=10)")
    assert cause(exc, URI) == f"MLflow at {URI} is unreachable: Read timed out"


def test_a_refusal_is_mlflows_error_code_and_the_first_line_of_its_message() -> None:
    exc = MlflowException("Invalid model name 'a/b'. Names cannot contain '/' or ':'.\nmore detail",
                          error_code=INVALID_PARAMETER_VALUE)
    assert cause(exc, URI) == "INVALID_PARAMETER_VALUE: Invalid model name 'a/b'. Names cannot contain '/' or ':'."


def test_a_versions_tags_name_its_round_and_leave_out_what_is_unknown() -> None:
    tags = version_tags(ROW)
    assert tags["branchkey.aggregation_id"] == "agg-7" and tags["branchkey.round"] == "7"
    assert tags["branchkey.updates_aggregated"] == "3" and tags["branchkey.upload_precision"] == "float16"
    assert "branchkey.dp_epsilon" not in tags and "branchkey.prefect_flow_run_url" not in tags


def test_the_model_and_experiment_are_named_by_the_branch_unless_the_block_says() -> None:
    assert RegistrySettings(URI).name_for("digits") == "digits"
    assert RegistrySettings(URI).experiment_for("digits") == "branchkey-digits"
    assert RegistrySettings(URI, model_name="site-model").experiment_for("digits") == "branchkey-site-model"
