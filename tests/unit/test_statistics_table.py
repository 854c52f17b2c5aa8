"""The statistics table a leaf publishes: the federation's values per column, its own beside them."""

from __future__ import annotations

import math

import numpy as np

from prefect_branchkey.bk_blocks.analytics import reduce_column
from prefect_branchkey.flows.statistics import statistics_table


def test_table_has_the_federations_and_the_sites_statistics_per_column() -> None:
    own = reduce_column("age", [10.0, 10.0, np.nan])
    other = reduce_column("age", [90.0, 90.0])
    combined = {k: own[k] + other[k] for k in ("age_n", "age_sum", "age_sumsq", "age_nan")}
    combined |= {"age_min": np.array([10.0]), "age_max": np.array([90.0])}
    [row] = statistics_table(combined, own)
    assert (row["column"], row["n"], row["mean"], row["variance"], row["std"], row["min"], row["max"]) == \
        ("age", 4, 50.0, 1600.0, 40.0, 10.0, 90.0)
    assert math.isclose(row["completeness"], 0.8)
    assert (row["site n"], row["site mean"], row["site std"]) == (2, 10.0, 0.0)
    assert math.isclose(row["site completeness"], 2 / 3)


def test_named_fields_are_not_columns_of_the_table() -> None:
    combined = reduce_column("x", [1.0]) | {"n_cases": np.array([3])}
    assert [row["column"] for row in statistics_table(combined, combined)] == ["x"]
