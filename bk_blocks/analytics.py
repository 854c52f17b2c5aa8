"""The federated-analytics archive format: site statistics instead of model layers.

A site reduces each raw column to a six-value bundle (`<col>_n`, `_sum`, `_sumsq`, `_min`,
`_max`, `_nan`) before anything is written, so raw values never leave it; values the site
reduced itself go in as named fields. The archive is what the official 3.x client's
`save_analytics` / `save_fields` write: the fields, `weighting` = `[0.0]` (unused, but the
platform reserves the name) and `__bk_payload_kind__` = `federated_analytics` as a 0-d string
array, compressed. A combined result has the same fields and the kind, and no weighting.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefect_branchkey.bk_blocks.archive import FEDERATED_ANALYTICS, PAYLOAD_KIND_KEY, NpzReader, _payload_kind
from prefect_branchkey.bk_blocks.errors import AnalyticsError
from prefect_branchkey.bk_blocks.files import atomic_write

BUNDLE_SUFFIXES = ("n", "sum", "sumsq", "min", "max", "nan")
BUNDLE_COMBINERS = {"n": "sum", "sum": "sum", "sumsq": "sum", "min": "min", "max": "max", "nan": "sum"}
BUNDLE_COUNT_SUFFIXES = frozenset({"n", "nan"})
COUNT_DTYPE = np.dtype(np.int64)
VALUE_DTYPE = np.dtype(np.float64)
NAN_OMIT = "omit"
NAN_RAISE = "raise"
NAN_POLICIES = (NAN_OMIT, NAN_RAISE)
RESERVED_NAMES = frozenset({"weighting", PAYLOAD_KIND_KEY})
_LAYER_NAME = re.compile(r"^layer_\d+$")
# Kinds a column may hold (numbers and booleans) and a field may hold (also complex and strings).
_COLUMN_KINDS = "biuf"
_FIELD_KINDS = "biufcUS"


@dataclass(frozen=True)
class FieldSpec:
    """One field of an analytics archive: its name, shape and (byte-order-free) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def kind(self) -> str:
        return np.dtype(self.dtype).kind


@dataclass(frozen=True)
class AnalyticsInfo:
    """A validated analytics archive: its fields by name, in archive order."""

    path: Path
    fields: dict[str, FieldSpec]


@dataclass(frozen=True)
class ColumnSummary:
    """One column's statistics derived from a (combined) bundle: count, completeness, moments, range."""

    n: int
    nan: int
    completeness: float
    mean: float
    variance: float
    std: float
    min: float
    max: float


def check_field_name(name: Any) -> str:
    """Refuse a field name the protocol reserves (`weighting`, the kind key, `layer_<n>`)."""
    if not isinstance(name, str) or not name:
        raise AnalyticsError("field names must be non-empty strings", None)
    if name in RESERVED_NAMES:
        raise AnalyticsError(f"'{name}' is a reserved name and cannot be a field", name)
    if _LAYER_NAME.match(name):
        raise AnalyticsError(f"'{name}' is reserved for model layers (layer_<n>) and cannot be a field", name)
    if "/" in name or "\\" in name:
        raise AnalyticsError(f"field name {name!r} holds a path separator", name)
    return name


def reduce_column(name: str, values: Any, nan_policy: str = NAN_OMIT) -> dict[str, np.ndarray]:
    """A raw column's six-value bundle (counts int64, values float64); the raw values stay here."""
    if nan_policy not in NAN_POLICIES:
        raise AnalyticsError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}", name)
    column = np.asarray(values)
    if column.dtype.kind not in _COLUMN_KINDS:
        raise AnalyticsError(f"column '{name}' has dtype {column.dtype}; a column must be numeric or boolean", name)
    if column.ndim != 1:
        raise AnalyticsError(f"column '{name}' has shape {column.shape}; a column must be 1-D, one value per record",
                             name)
    column = column.astype(VALUE_DTYPE, copy=False)
    if np.isinf(column).any():
        raise AnalyticsError(f"column '{name}' holds an infinite value; clean or clip it first", name)
    missing = np.isnan(column)
    nan_count = int(missing.sum())
    if nan_count and nan_policy == NAN_RAISE:
        raise AnalyticsError(f"column '{name}' holds {nan_count} NaN value(s) and nan_policy is 'raise'", name)
    present = column[~missing] if nan_count else column
    if present.size == 0:
        raise AnalyticsError(f"column '{name}' holds no values (after omitting NaN); drop the column", name)
    reduced = {
        "n": np.array([present.size], dtype=COUNT_DTYPE), "sum": np.array([present.sum()], dtype=VALUE_DTYPE),
        "sumsq": np.array([np.square(present).sum()], dtype=VALUE_DTYPE),
        "min": np.array([present.min()], dtype=VALUE_DTYPE), "max": np.array([present.max()], dtype=VALUE_DTYPE),
        "nan": np.array([nan_count], dtype=COUNT_DTYPE),
    }
    return {f"{name}_{suffix}": reduced[suffix] for suffix in BUNDLE_SUFFIXES}


def bundles_of(columns: Mapping[str, Any], nan_policy: str = NAN_OMIT) -> dict[str, np.ndarray]:
    """Every column's bundle, in column order, refusing a name that collides with another's bundle."""
    if not isinstance(columns, Mapping) or not columns:
        raise AnalyticsError("columns must be a non-empty mapping of name to raw values", None)
    entries: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name, values in columns.items():
        check_field_name(name)
        for key, value in reduce_column(name, values, nan_policy).items():
            check_field_name(key)
            if key in entries:
                raise AnalyticsError(f"column '{name}' produces '{key}', which column '{origin[key]}' already "
                                     f"produced; rename one of them", key)
            entries[key], origin[key] = value, name
    return entries


def field_value(name: str, value: Any) -> np.ndarray:
    """A pre-reduced field as the archive stores it: at least 1-D, a storable, combinable dtype."""
    check_field_name(name)
    array = np.atleast_1d(np.asarray(value))
    if array.dtype.hasobject or array.dtype.kind not in _FIELD_KINDS:
        raise AnalyticsError(f"field '{name}' has dtype {array.dtype}; fields must be numeric, boolean or "
                             f"string", name)
    return array


def write_fields(path: str | os.PathLike[str], fields: Mapping[str, Any]) -> Path:
    """Write pre-reduced named fields as an analytics archive (atomically), as `save_fields` does."""
    if not isinstance(fields, Mapping) or not fields:
        raise AnalyticsError("fields must be a non-empty mapping of name to value", None)
    arrays = {name: field_value(name, value) for name, value in fields.items()}
    arrays["weighting"] = np.array([0.0], dtype=np.float64)
    arrays[PAYLOAD_KIND_KEY] = np.array(FEDERATED_ANALYTICS)
    target = Path(path)
    with atomic_write(target) as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: a **kwds key could shadow allow_pickle
    return target


def write_statistics(path: str | os.PathLike[str], columns: Mapping[str, Any], nan_policy: str = NAN_OMIT,
                     fields: Mapping[str, Any] | None = None) -> Path:
    """Reduce raw columns to their bundles and write them (plus any pre-reduced `fields`), as
    `save_analytics` does; the archive never holds a raw value."""
    entries: dict[str, Any] = dict(bundles_of(columns, nan_policy))
    for name, value in (fields or {}).items():
        if name in entries:
            raise AnalyticsError(f"field '{name}' collides with a column's bundle entry", name)
        entries[name] = value
    return write_fields(path, entries)


def inspect_analytics(path: str | os.PathLike[str], *, combined: bool = False) -> AnalyticsInfo:
    """Validate an analytics archive's structure and describe its fields; raise `AnalyticsError`.

    An upload may carry `weighting` (one number, unused); a `combined` result may not.
    """
    with NpzReader(path) as reader:
        if _payload_kind(reader) != FEDERATED_ANALYTICS:
            raise AnalyticsError(f"{PAYLOAD_KIND_KEY} must say {FEDERATED_ANALYTICS}", PAYLOAD_KIND_KEY)
        weighting = reader.members.get("weighting")
        if weighting is not None and (combined or weighting.count != 1 or weighting.dtype.kind not in "fiu"):
            raise AnalyticsError("'weighting' in an analytics archive must be one number (it is not used)",
                                 "weighting")
        fields: dict[str, FieldSpec] = {}
        for name, spec in reader.members.items():
            if name in RESERVED_NAMES:
                continue
            check_field_name(name)
            if len(spec.shape) == 0:
                raise AnalyticsError(f"field '{name}' is 0-d; every field is at least 1-D", name)
            if spec.dtype.kind not in _FIELD_KINDS or spec.dtype.fields is not None:
                raise AnalyticsError(f"field '{name}' has dtype {spec.dtype}; fields must be numeric, boolean or "
                                     f"string", name)
            fields[name] = FieldSpec(name, spec.shape, spec.dtype.newbyteorder("=").str)
        if not fields:
            raise AnalyticsError("the archive holds no fields", None)
        return AnalyticsInfo(Path(path), fields)


def read_fields(path: str | os.PathLike[str], *, combined: bool = False) -> dict[str, np.ndarray]:
    """Validate and load an analytics archive's fields (not `weighting` or the kind)."""
    info = inspect_analytics(path, combined=combined)
    with NpzReader(path) as reader:
        return {name: reader.read_array(name) for name in info.fields}


def bundle_columns(names: Sequence[str]) -> list[str]:
    """The columns whose whole six-value bundle is among `names`, in order of first appearance."""
    present = set(names)
    columns: list[str] = []
    for name in names:
        stem, _, suffix = name.rpartition("_")
        if suffix == BUNDLE_SUFFIXES[0] and stem and stem not in columns \
                and all(f"{stem}_{s}" in present for s in BUNDLE_SUFFIXES):
            columns.append(stem)
    return columns


def summarize(fields: Mapping[str, np.ndarray], column: str) -> ColumnSummary:
    """Count, completeness, mean, variance (population), std, min and max of one column's bundle."""
    value = {s: fields[f"{column}_{s}"].reshape(-1)[0] for s in BUNDLE_SUFFIXES}
    n, nan = int(value["n"]), int(value["nan"])
    mean = float(value["sum"]) / n if n else math.nan
    variance = max(float(value["sumsq"]) / n - mean * mean, 0.0) if n else math.nan
    return ColumnSummary(n, nan, n / (n + nan) if n + nan else math.nan, mean, variance, math.sqrt(variance),
                         float(value["min"]), float(value["max"]))
