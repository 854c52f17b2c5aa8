"""The analytics archive format: bundles, named fields, the refusals, and what is never written."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.analytics import (
    BUNDLE_SUFFIXES,
    bundle_columns,
    inspect_analytics,
    read_fields,
    reduce_column,
    summarize,
    write_fields,
    write_statistics,
)
from prefect_branchkey.bk_blocks.archive import PAYLOAD_KIND_KEY, inspect_update
from prefect_branchkey.bk_blocks.errors import AnalyticsError, BranchKeyError, PickledArrayError


def test_column_reduces_to_the_six_value_bundle_with_fixed_dtypes():
    bundle = reduce_column("age", np.array([10, 20, 30], dtype=np.int32))
    assert list(bundle) == [f"age_{s}" for s in BUNDLE_SUFFIXES]
    assert bundle["age_n"].dtype == np.int64 and bundle["age_nan"].dtype == np.int64
    assert {bundle[f"age_{s}"].dtype for s in ("sum", "sumsq", "min", "max")} == {np.dtype(np.float64)}
    assert [float(bundle[k][0]) for k in ("age_n", "age_sum", "age_sumsq", "age_min", "age_max", "age_nan")] == \
        [3, 60, 1400, 10, 30, 0]


def test_nan_omitted_and_counted_under_omit():
    bundle = reduce_column("bmi", [1.0, np.nan, 3.0, np.nan])
    assert int(bundle["bmi_n"][0]) == 2 and int(bundle["bmi_nan"][0]) == 2 and float(bundle["bmi_sum"][0]) == 4.0


def test_nan_refused_under_raise():
    with pytest.raises(AnalyticsError, match="column 'bmi' holds 1 NaN value\\(s\\) and nan_policy is 'raise'"):
        reduce_column("bmi", [1.0, np.nan], "raise")


def test_nan_field_present_even_when_zero_under_raise():
    assert int(reduce_column("x", [1.0, 2.0], "raise")["x_nan"][0]) == 0


def test_infinity_refused():
    with pytest.raises(AnalyticsError, match="column 'x' holds an infinite value"):
        reduce_column("x", [1.0, np.inf])


def test_two_dimensional_column_refused():
    with pytest.raises(AnalyticsError, match="column 'x' has shape \\(2, 2\\); a column must be 1-D"):
        reduce_column("x", np.ones((2, 2)))


def test_string_column_refused():
    with pytest.raises(AnalyticsError, match="column 'site' has dtype <U1; a column must be numeric"):
        reduce_column("site", ["a", "b"])


def test_empty_column_refused():
    with pytest.raises(AnalyticsError, match="column 'x' holds no values"):
        reduce_column("x", [np.nan], "omit")


@pytest.mark.parametrize("name, message", [
    ("weighting", "'weighting' is a reserved name"),
    (PAYLOAD_KIND_KEY, "is a reserved name"),
    ("layer_3", "'layer_3' is reserved for model layers"),
])
def test_reserved_column_names_refused(tmp_path, name, message):
    with pytest.raises(AnalyticsError, match=message):
        write_statistics(tmp_path / "s.npz", {name: [1.0]})


def test_bundle_entry_colliding_with_a_field_refused(tmp_path):
    with pytest.raises(AnalyticsError, match="field 'age_n' collides with a column's bundle entry"):
        write_statistics(tmp_path / "s.npz", {"age": [1.0]}, fields={"age_n": 3})


def test_unknown_nan_policy_refused():
    with pytest.raises(AnalyticsError, match="nan_policy must be one of omit, raise"):
        reduce_column("x", [1.0], "drop")


def test_analytics_errors_derive_from_the_root():
    assert issubclass(AnalyticsError, BranchKeyError)


def test_statistics_archive_never_holds_raw_values(tmp_path):
    raw = np.array([111.222, 200.5, 654.321])
    path = write_statistics(tmp_path / "s.npz", {"value": raw})
    data = b"".join(zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist())
    assert np.float64(200.5).tobytes() not in data
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted([f"value_{s}" for s in BUNDLE_SUFFIXES]
                                               + ["weighting", PAYLOAD_KIND_KEY])


def test_archive_layout_is_the_official_clients(tmp_path):
    path = write_statistics(tmp_path / "s.npz", {"age": [1.0, 2.0]}, fields={"n_cases": 2})
    with zipfile.ZipFile(path) as archive:
        assert [i.compress_type for i in archive.infolist()] == [zipfile.ZIP_DEFLATED] * 9
        assert archive.namelist()[-2:] == ["weighting.npy", f"{PAYLOAD_KIND_KEY}.npy"]
    with np.load(path, allow_pickle=False) as archive:
        assert archive[PAYLOAD_KIND_KEY].shape == () and str(archive[PAYLOAD_KIND_KEY]) == "federated_analytics"
        assert archive["weighting"].tolist() == [0.0] and archive["n_cases"].shape == (1,)
    assert inspect_update(path).kind == "federated_analytics"


def test_fields_round_trip(tmp_path):
    path = write_fields(tmp_path / "f.npz", {"spacing": [1.0, 0.8, 0.8], "site": "north", "n_cases": 312})
    fields = read_fields(path)
    assert fields["spacing"].tolist() == [1.0, 0.8, 0.8] and fields["site"].tolist() == ["north"]
    assert inspect_analytics(path).fields["n_cases"].shape == (1,)


def test_zero_dimensional_field_refused(tmp_path):
    np.savez(tmp_path / "a.npz", **{PAYLOAD_KIND_KEY: np.array("federated_analytics"), "age_n": np.array(3)})
    with pytest.raises(AnalyticsError, match="field 'age_n' is 0-d"):
        inspect_analytics(tmp_path / "a.npz")


def test_object_field_refused(tmp_path):
    np.savez(tmp_path / "a.npz", **{PAYLOAD_KIND_KEY: np.array("federated_analytics"),
                                    "notes": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(PickledArrayError, match="'notes' is an object array"):
        inspect_analytics(tmp_path / "a.npz")


def test_layer_named_field_refused_when_read(tmp_path):
    np.savez(tmp_path / "a.npz", **{PAYLOAD_KIND_KEY: np.array("federated_analytics"), "layer_0": np.ones(1)})
    with pytest.raises(AnalyticsError, match="'layer_0' is reserved for model layers"):
        inspect_analytics(tmp_path / "a.npz")


def test_summary_matches_the_pooled_columns():
    a, b = np.array([10.0, 10.0, 10.0]), np.array([90.0, 90.0, 90.0, np.nan])
    ba, bb = reduce_column("x", a), reduce_column("x", b)
    combined = {k: ba[k] + bb[k] for k in ("x_n", "x_sum", "x_sumsq", "x_nan")}
    combined |= {"x_min": np.minimum(ba["x_min"], bb["x_min"]), "x_max": np.maximum(ba["x_max"], bb["x_max"])}
    summary = summarize(combined, "x")
    assert (summary.n, summary.nan, summary.mean, summary.variance, summary.min, summary.max) == \
        (6, 1, 50.0, 1600.0, 10.0, 90.0)
    assert summary.completeness == 6 / 7 and summary.std == 40.0


def test_bundle_columns_lists_only_complete_bundles():
    names = [f"age_{s}" for s in BUNDLE_SUFFIXES] + ["spacing_max", "n_cases"]
    assert bundle_columns(names) == ["age"]
