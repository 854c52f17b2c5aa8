"""The pieces flows are built from: participant loading, model adapters, history, the `bk` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prefect_branchkey.flows.adapters import ShapeMismatchError, assign_parameters, numpy_to_torch, torch_to_numpy
from prefect_branchkey.flows.examples.digits import DigitsSoftmax, non_iid_split
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_dir, history_rows
from prefect_branchkey.flows.leaf.state import StateError, load_state, save_state
from prefect_branchkey.flows.participant import (
    Participant,
    ParticipantError,
    TrainResult,
    check_result,
    load_participant,
)
from prefect_branchkey.flows.publishing.observability import artifact_key, sparkline, summary_markdown


def record(round_number: int, **extra: object) -> RoundRecord:
    return RoundRecord("branch", "leaf", "leaf-a", 1, round_number, "completed", eval_metrics={"accuracy": 0.5},
                       **extra)


def test_participant_is_loaded_by_import_path_with_json_options() -> None:
    participant = load_participant("prefect_branchkey.flows.examples.digits:DigitsSoftmax",
                                   '{"leaf_index": 1, "leaves": 2}')
    assert isinstance(participant, DigitsSoftmax) and participant.y_train.size > 0


@pytest.mark.parametrize(("path", "options", "words"), [
    ("prefect_branchkey.flows.examples.digits", None, "'package.module:Class'"),
    ("flows.nope:Thing", None, "cannot import"),
    ("json:JSONDecoder", None, "not a Participant subclass"),
    ("prefect_branchkey.flows.examples.digits:DigitsSoftmax", "{bad json", "not valid JSON"),
    ("prefect_branchkey.flows.examples.digits:DigitsSoftmax", "[1]", "must be a JSON object"),
])
def test_bad_participant_spec_names_the_problem(path: str, options: str | None, words: str) -> None:
    with pytest.raises(ParticipantError, match=words):
        load_participant(path, options)


def test_train_result_with_bad_weighting_is_refused() -> None:
    with pytest.raises(ParticipantError, match="finite and > 0"):
        check_result(TrainResult(0.0, [np.ones(2)]))


def test_participant_defaults_evaluate_nothing_and_take_part() -> None:
    class Minimal(Participant):
        def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
            return TrainResult(1.0, [np.ones(1)])

    assert Minimal().evaluate([np.ones(1)], 1) == {} and Minimal().participate(1)


def test_non_iid_split_gives_each_leaf_mostly_its_own_classes() -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = non_iid_split(labels, 3, skew=0.8, rng=np.random.default_rng(0))
    assert sum(s.size for s in shards) == labels.size
    own = [np.mean(labels[s] % 3 == leaf) for leaf, s in enumerate(shards)]
    assert min(own) > 0.8


def test_assign_parameters_refuses_a_shape_mismatch() -> None:
    with pytest.raises(ShapeMismatchError, match="layer_0"):
        assign_parameters([np.zeros((2, 2))], [np.zeros((3, 2))])


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.norm = torch.nn.BatchNorm2d(2)
        self.head = torch.nn.Linear(8, 3)


def test_torch_state_round_trips_in_state_dict_order_with_dtypes() -> None:
    torch.manual_seed(0)
    source, target = Net(), Net()
    source.norm.num_batches_tracked += 5
    arrays = torch_to_numpy(source)
    assert [a.shape for a in arrays] == [tuple(t.shape) for t in source.state_dict().values()]
    assert arrays[-3].dtype == np.int64, "the batch-norm counter stays an integer"
    numpy_to_torch(target, arrays)
    for (name, want), got in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def test_torch_order_is_the_same_for_every_instance() -> None:
    assert list(Net().state_dict()) == list(Net().state_dict())


def test_loading_mismatched_arrays_into_torch_is_refused() -> None:
    arrays = torch_to_numpy(Net())
    arrays[0] = np.zeros((9, 9), np.float32)
    with pytest.raises(ShapeMismatchError, match=r"layer_0 \(conv.weight\)"):
        numpy_to_torch(Net(), arrays)


def test_history_appends_one_file_per_round_and_reads_in_order(tmp_path: Path) -> None:
    append_record(tmp_path, record(2))
    append_record(tmp_path, record(1, train_metrics={"loss": 0.3}))
    rows = history_rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["train_metrics"] == {"loss": 0.3}


def test_recording_a_round_again_replaces_its_row(tmp_path: Path) -> None:
    append_record(tmp_path, record(1))
    append_record(tmp_path, record(1, weighting=3.0))
    assert [r["weighting"] for r in history_rows(tmp_path)] == [3.0]


def test_a_crash_mid_write_leaves_earlier_rounds_readable(tmp_path: Path) -> None:
    first = append_record(tmp_path, record(1))
    (history_dir(tmp_path) / ".half-written.tmp").write_bytes(b"PAR1 truncated")
    assert [r["round"] for r in history_rows(tmp_path)] == [1]
    assert pq.read_table(first).num_rows == 1


def test_state_of_another_leaf_is_refused(tmp_path: Path) -> None:
    save_state(tmp_path, load_state(tmp_path, "leaf-a"))
    with pytest.raises(StateError, match="belongs to leaf leaf-a"):
        load_state(tmp_path, "leaf-b")


def test_summary_shows_latest_metric_and_trend() -> None:
    rows = [{"round": r, "run_number": 1, "status": "completed", "aggregation_id": f"a{r}",
             "eval_metrics": {"accuracy": acc}, "train_metrics": {}} for r, acc in ((1, 0.5), (2, 0.75), (3, 1.0))]
    text = summary_markdown("leaf-a", rows)
    assert "| eval accuracy | 1.0000 | 0.7500 | ▁▅█ |" in text
    assert sparkline([1.0, 1.0]) == "▁▁"


def test_artifact_keys_are_valid_and_stable() -> None:
    assert artifact_key("history", "Hospital A/Ward 3") == "branchkey-history-hospital-a-ward-3"


def test_bk_history_prints_json_csv_and_a_table(tmp_path: Path) -> None:
    append_record(tmp_path, record(1))

    def run(fmt: str) -> str:
        return subprocess.run([sys.executable, "-m", "prefect_branchkey.deployments.cli", "history",
                               "--work-dir", str(tmp_path), "--format", fmt],
                              capture_output=True, text=True, check=True).stdout

    assert json.loads(run("json"))[0]["eval_accuracy"] == 0.5
    assert run("csv").splitlines()[0].startswith("run_number,round,status")
    assert "eval accuracy" in run("table")
