"""Streaming FedAvg: results against a direct float64 computation, dtypes, refusals, atomicity."""

from __future__ import annotations

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import read_aggregate, write_update
from prefect_branchkey.bk_server.fedavg import AggregationError, WeightedUpdate, fedavg, normalised_weights


def make_updates(tmp_path, weightings, layer_lists, compress=False):
    """Write one update archive per (weighting, layers); `compress` may be a list per update."""
    flags = compress if isinstance(compress, list) else [compress] * len(weightings)
    updates = []
    for index, (weighting, layers, flag) in enumerate(zip(weightings, layer_lists, flags, strict=False)):
        path = write_update(tmp_path / f"in-{index}.npz", weighting, layers, compress=flag)
        updates.append(WeightedUpdate(path, float(weighting)))
    return updates


def reference(weightings, layer_lists):
    """sum_i w_i * theta_i / sum_i w_i in float64, cast back to each layer's dtype."""
    w = np.asarray(weightings, dtype=np.float64)
    averaged = []
    for layers in zip(*layer_lists, strict=False):
        total = sum(wi * layer.astype(np.float64) for wi, layer in zip(w, layers, strict=False))
        averaged.append((total / w.sum()).astype(layers[0].dtype))
    return averaged


def aggregate(tmp_path, updates, **kwargs):
    return read_aggregate(fedavg(updates, tmp_path / "out" / "agg.npz", **kwargs))


# --- values ----------------------------------------------------------------------------


def test_float32_layers_equal_the_float64_reference_across_many_small_chunks(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(1001,), (37, 13), (5,)]
    weightings = [1, 250, 7.5, 40]
    layer_lists = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in weightings]
    # 60 bytes: 7 float64 accumulator slots but 15 float32 elements per read, so reads
    # and accumulator windows never line up and layers span dozens of chunks.
    result = aggregate(tmp_path, make_updates(tmp_path, weightings, layer_lists), chunk_bytes=60)
    for got, want in zip(result, reference(weightings, layer_lists), strict=False):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)


def test_float16_layers_with_large_weightings_stay_finite_and_match_reference(tmp_path):
    weightings = [40_000, 60_000]
    layer_lists = [[np.linspace(2, 60, 301, dtype=np.float16)], [np.linspace(-30, 9, 301, dtype=np.float16)]]
    with np.errstate(over="ignore"):  # Flower-style scaling by the raw count overflows float16
        assert not np.isfinite(layer_lists[0][0] * np.float16(weightings[0])).all()
    [got] = aggregate(tmp_path, make_updates(tmp_path, weightings, layer_lists), chunk_bytes=64)
    [want] = reference(weightings, layer_lists)
    assert got.dtype == np.float16
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_integer_layers_keep_their_dtype_and_round_half_to_even(tmp_path, dtype):
    a = np.array([1, 2, 0, -1, -2, 10], dtype=dtype)
    b = np.array([2, 3, 1, -2, -3, 10], dtype=dtype)
    # equal weights: means 1.5, 2.5, 0.5, -1.5, -2.5, 10 -> np.rint (half to even)
    [got] = aggregate(tmp_path, make_updates(tmp_path, [3, 3], [[a], [b]]))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.array([2, 2, 0, -2, -2, 10], dtype=dtype))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_integer_layers_at_their_dtype_limits_do_not_wrap_around(tmp_path, dtype):
    info = np.iinfo(dtype)
    layer = np.array([info.max, info.min], dtype=dtype)
    [got] = aggregate(tmp_path, make_updates(tmp_path, [1, 1], [[layer], [layer.copy()]]))
    assert got.dtype == dtype
    assert got[0] > info.max - 2**11  # within float64 precision of the max, not wrapped to the min
    assert got[1] == info.min


def test_integer_layers_follow_the_weights(tmp_path):
    a, b = np.array([0, 100], dtype=np.int64), np.array([10, 0], dtype=np.int64)
    [got] = aggregate(tmp_path, make_updates(tmp_path, [1, 3], [[a], [b]]))
    np.testing.assert_array_equal(got, [8, 25])  # 7.5 -> 8 (half to even), 25


def test_bool_layers_come_back_bool_by_weighted_majority(tmp_path):
    layer_lists = [
        [np.array([True, False, True, False])],
        [np.array([True, False, False, True])],
        [np.array([False, True, False, True])],
    ]
    # weights 1, 1, 3: True wins only where the weight-3 update votes True
    [got] = aggregate(tmp_path, make_updates(tmp_path, [1, 1, 3], layer_lists))
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, [False, True, False, True])


def test_mix_of_stored_and_compressed_updates_is_averaged(tmp_path):
    rng = np.random.default_rng(1)
    weightings = [2, 5, 3]
    layer_lists = [[rng.normal(size=(17, 19)).astype(np.float32), rng.normal(size=333)] for _ in weightings]
    updates = make_updates(tmp_path, weightings, layer_lists, compress=[True, False, True])
    result = aggregate(tmp_path, updates, chunk_bytes=44)
    for got, want in zip(result, reference(weightings, layer_lists), strict=False):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=2e-7 if want.dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("fortran_first", [True, False], ids=["fortran-then-c", "c-then-fortran"])
def test_fortran_and_c_ordered_layers_are_averaged_element_wise(tmp_path, fortran_first):
    x = np.arange(35, dtype=np.float64).reshape(5, 7)
    y = 100 + 2 * np.arange(35, dtype=np.float64).reshape(5, 7)
    first, second = (np.asfortranarray(x), y) if fortran_first else (x, np.asfortranarray(y))
    assert first.flags.f_contiguous != second.flags.f_contiguous
    [got] = aggregate(tmp_path, make_updates(tmp_path, [1, 3], [[first], [second]]), chunk_bytes=48)
    np.testing.assert_allclose(got, (x + 3 * y) / 4, rtol=1e-12)


# --- refusals --------------------------------------------------------------------------


def test_updates_with_different_shapes_are_refused(tmp_path):
    updates = make_updates(tmp_path, [1, 1], [[np.ones((2, 3))], [np.ones((3, 2))]])
    with pytest.raises(AggregationError, match=r"layer_0 is \(3, 2\).*expected \(2, 3\)"):
        fedavg(updates, tmp_path / "agg.npz")


def test_updates_with_different_dtypes_are_refused(tmp_path):
    updates = make_updates(tmp_path, [1, 1], [[np.ones(4, np.float32)], [np.ones(4, np.float64)]])
    with pytest.raises(AggregationError, match=r"layer_0 is .*float64, expected .*float32"):
        fedavg(updates, tmp_path / "agg.npz")


def test_updates_with_different_layer_counts_are_refused(tmp_path):
    updates = make_updates(tmp_path, [1, 1], [[np.ones(4), np.ones(2)], [np.ones(4)]])
    with pytest.raises(AggregationError, match="has 1 layers, expected 2"):
        fedavg(updates, tmp_path / "agg.npz")


def test_round_with_no_updates_is_refused(tmp_path):
    with pytest.raises(AggregationError, match="no updates"):
        fedavg([], tmp_path / "agg.npz")
    assert list(tmp_path.iterdir()) == []


# --- output file -----------------------------------------------------------------------


def test_successful_aggregation_leaves_only_the_output_file(tmp_path):
    updates = make_updates(tmp_path, [1, 2], [[np.ones(10)], [np.zeros(10)]])
    out = fedavg(updates, tmp_path / "out" / "agg.npz")
    assert [p.name for p in out.parent.iterdir()] == ["agg.npz"]


def test_failed_aggregation_leaves_no_output_and_no_temporary_file(tmp_path):
    updates = make_updates(tmp_path, [1, 1], [[np.ones(10), np.ones(3)], [np.ones(10), np.ones(4)]])
    out_dir = tmp_path / "out"
    with pytest.raises(AggregationError):
        fedavg(updates, out_dir / "agg.npz")
    assert list(out_dir.iterdir()) == []


def test_normalised_weights_sum_to_one_in_proportion():
    weights = normalised_weights([1, 2, 3.5, 1e9])
    assert weights.dtype == np.float64
    assert weights.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(weights[:3] / weights[0], [1, 2, 3.5])


def test_huge_weightings_do_not_overflow_into_zero_coefficients():
    assert np.allclose(normalised_weights([1e308, 1e308]), [0.5, 0.5])
