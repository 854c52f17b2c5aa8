"""A large model held once: the global model loaded into the participant's own arrays in place,
and the update compared with the aggregate's archive read chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import AggregateLayers, LayerError, read_aggregate_into
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.updates.deltas import CHUNK, delta_norm
from prefect_branchkey.flows.updates.privacy import privatize
from prefect_branchkey.flows.updates.transforms import load_global_model


def _aggregate(path: Path, layers: list[np.ndarray]) -> Path:
    """An aggregate archive (layers only, as the platform writes them)."""
    np.savez(path, **{f"layer_{i}": layer for i, layer in enumerate(layers)})
    return path


class Live(Participant):
    """A participant that offers its model's arrays to be loaded in place."""

    def __init__(self, layers: list[np.ndarray]) -> None:
        self.layers = layers

    def parameters(self) -> list[np.ndarray]:
        return self.layers

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(1.0, self.layers)


GLOBAL = [np.arange(CHUNK * 2 + 5, dtype=np.float32).reshape(-1, 1), np.full(3, 7, np.int64)]


def test_global_model_is_loaded_into_the_participants_arrays(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", GLOBAL)
    mine = [np.zeros_like(layer) for layer in GLOBAL]
    ids = [id(layer) for layer in mine]
    loaded = load_global_model(Live(mine), path, [layer.dtype.str for layer in mine])
    assert [id(layer) for layer in loaded] == ids
    assert all(np.array_equal(a, b) for a, b in zip(loaded, GLOBAL, strict=True))


def test_a_participant_without_live_arrays_gets_new_arrays(tmp_path: Path) -> None:
    class Plain(Participant):
        def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
            return TrainResult(1.0, [])

    loaded = load_global_model(Plain(), _aggregate(tmp_path / "agg.npz", GLOBAL), [])
    assert all(np.array_equal(a, b) for a, b in zip(loaded, GLOBAL, strict=True))


def test_in_place_load_casts_to_the_models_dtype(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", [np.full(10, 1.5, np.float16)])
    mine = [np.zeros(10, np.float32)]
    read_aggregate_into(path, mine)
    assert mine[0].dtype == np.float32 and np.all(mine[0] == 1.5)


def test_an_aggregate_of_another_shape_is_refused_naming_the_layer_and_nothing_is_written(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", [np.ones(4, np.float32), np.ones((2, 3), np.float32)])
    mine = [np.zeros(4, np.float32), np.zeros((3, 2), np.float32)]
    with pytest.raises(LayerError, match=r"layer_1: the aggregate's shape is \(2, 3\), the model's \(3, 2\)"):
        read_aggregate_into(path, mine)
    assert not mine[0].any() and not mine[1].any()


def test_an_aggregate_holding_nan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", [np.ones(4, np.float32), np.array([1.0, np.nan], np.float32)])
    mine = [np.zeros(4, np.float32), np.zeros(2, np.float32)]
    with pytest.raises(LayerError, match="layer_1 holds NaN"):
        read_aggregate_into(path, mine)
    assert not mine[0].any()


def test_delta_norm_against_the_archive_equals_the_norm_against_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    update = [rng.standard_normal((CHUNK * 2 + 5,), dtype=np.float32), np.full(3, 9, np.int64)]
    base = [rng.standard_normal((CHUNK * 2 + 5,), dtype=np.float32), np.full(3, 7, np.int64)]
    with AggregateLayers(_aggregate(tmp_path / "agg.npz", base)) as archive:
        assert delta_norm(update, archive) == pytest.approx(delta_norm(update, base), rel=1e-12)


def test_privatize_against_the_archive_equals_privatize_against_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    update = [rng.standard_normal(CHUNK + 17, dtype=np.float32)]
    base = [rng.standard_normal(CHUNK + 17, dtype=np.float32)]
    in_memory = privatize(update, base, 1.0, 0.5, np.random.default_rng(2))
    with AggregateLayers(_aggregate(tmp_path / "agg.npz", base)) as archive:
        from_archive = privatize(update, archive, 1.0, 0.5, np.random.default_rng(2))
    assert np.array_equal(in_memory[0], from_archive[0])


def test_a_fortran_ordered_aggregate_is_compared_element_by_element(tmp_path: Path) -> None:
    update = [np.arange(12, dtype=np.float32).reshape(3, 4)]
    with AggregateLayers(_aggregate(tmp_path / "agg.npz", [np.asfortranarray(update[0])])) as archive:
        assert delta_norm(update, archive) == 0.0


def test_privatize_against_a_fortran_ordered_archive_keeps_each_value_in_place(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    update = [base + np.float32(1.0)]
    with AggregateLayers(_aggregate(tmp_path / "agg.npz", [np.asfortranarray(base)])) as archive:
        from_archive = privatize(update, archive, 1.0, 1e-12, np.random.default_rng(0))
    np.testing.assert_allclose(from_archive[0], privatize(update, [base], 1.0, 1e-12, np.random.default_rng(0))[0])


def test_a_fortran_ordered_aggregate_loads_into_a_c_ordered_model(tmp_path: Path) -> None:
    aggregate = np.arange(12, dtype=np.float32).reshape(3, 4)
    mine = [np.zeros((3, 4), np.float32)]
    read_aggregate_into(_aggregate(tmp_path / "agg.npz", [np.asfortranarray(aggregate)]), mine)
    assert np.array_equal(mine[0], aggregate)


def test_a_non_contiguous_model_layer_is_loaded_too(tmp_path: Path) -> None:
    backing = np.zeros((4, 6), np.float32)
    mine = [np.zeros(3, np.float32), backing[:, ::2]]
    aggregate = _aggregate(tmp_path / "agg.npz", [np.ones(3, np.float32), np.full((4, 3), 2, np.float32)])
    read_aggregate_into(aggregate, mine)
    assert np.all(mine[0] == 1) and np.all(backing[:, ::2] == 2) and np.all(backing[:, 1::2] == 0)


def test_a_float_aggregate_for_an_integer_layer_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", [np.ones(3, np.float32), np.ones(3, np.float32)])
    mine = [np.zeros(3, np.float32), np.zeros(3, np.int64)]
    with pytest.raises(LayerError, match="layer_1: the aggregate holds float32, the model's layer is int64"):
        read_aggregate_into(path, mine)
    assert not mine[0].any()


def test_values_beyond_a_narrower_layers_range_are_refused(tmp_path: Path) -> None:
    path = _aggregate(tmp_path / "agg.npz", [np.array([1.0, 1e6], np.float32)])
    with pytest.raises(LayerError, match="layer_0: values beyond float16's range"):
        read_aggregate_into(path, [np.zeros(2, np.float16)])
