"""How the platform takes and combines statistics payloads (`federated_analytics`).

A field is combined by a fixed rule when it belongs to a column's bundle (`<col>_n`, `_sum`,
`_sumsq`, `_nan` by sum, `_min` by min, `_max` by max), otherwise by the operation the branch
configuration assigns it (sum, min, max, must_match, or mean weighted by a count field). The
first accepted payload of a run freezes its fields (shape, dtype, operation); a later payload
that disagrees is refused with a `code` and a message naming the field, and never disturbs the
round. Pure functions: `platform.py` calls them under its lock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prefect_branchkey.bk_blocks.analytics import (
    BUNDLE_COMBINERS,
    BUNDLE_COUNT_SUFFIXES,
    BUNDLE_SUFFIXES,
    COUNT_DTYPE,
    VALUE_DTYPE,
    AnalyticsInfo,
    FieldSpec,
    check_field_name,
    read_fields,
)
from prefect_branchkey.bk_blocks.archive import FEDERATED_ANALYTICS, PAYLOAD_KIND_KEY
from prefect_branchkey.bk_blocks.errors import AnalyticsError
from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.bk_server.errors import BadRequest, UploadRejected

OPERATIONS = ("sum", "min", "max", "mean", "must_match")
_NUMERIC_OPERATIONS = frozenset({"sum", "min", "max", "mean"})
_NUMERIC_KINDS = "biuf"


class AnalyticsRejected(UploadRejected):
    """A statistics payload refused by one of the combine rules; `code` says which rule."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Assignment:
    """The operation the branch configuration gives a named field (`weight`: mean's count field)."""

    op: str
    weight: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"op": self.op} | ({"weight": self.weight} if self.weight else {})


def parse_assignments(raw: Any) -> dict[str, Assignment]:
    """The branch's field operations from `{"field": "sum" | {"op": "mean", "weight": "n"}}`; 400 if unusable."""
    if not isinstance(raw, Mapping):
        raise BadRequest("fields must be a JSON object of field name to operation")
    assignments: dict[str, Assignment] = {}
    for name, value in raw.items():
        try:
            check_field_name(name)
        except AnalyticsError as exc:
            raise BadRequest(str(exc)) from None
        op, weight = (value, None) if isinstance(value, str) else \
            (value.get("op"), value.get("weight")) if isinstance(value, Mapping) else (None, None)
        if op not in OPERATIONS:
            raise BadRequest(f"field '{name}': operation must be one of {', '.join(OPERATIONS)}, got {op!r}")
        if (op == "mean") != (weight is not None) or (weight is not None and not isinstance(weight, str)):
            raise BadRequest(f"field '{name}': 'mean' needs a 'weight' naming a count field, and only 'mean' takes one")
        assignments[name] = Assignment(op, weight)
    for name, assignment in assignments.items():
        if assignment.weight is not None and assignment.weight not in assignments:
            raise BadRequest(f"field '{name}' is weighted by '{assignment.weight}', which has no operation of its own")
    return assignments


def assignments_json(assignments: Mapping[str, Assignment]) -> str:
    return json.dumps({name: a.as_json() for name, a in assignments.items()}, sort_keys=True)


def load_assignments(text: str | None) -> dict[str, Assignment]:
    """The assignments as `assignments_json` stored them (none when unset)."""
    return {name: Assignment(v["op"], v.get("weight")) for name, v in json.loads(text or "{}").items()}


def schema_of(info: AnalyticsInfo, assignments: Mapping[str, Assignment]) -> dict[str, dict[str, Any]]:
    """A payload's fields with the operation each takes, refusing one no rule covers."""
    schema: dict[str, dict[str, Any]] = {}
    for name, spec in info.fields.items():
        assignment = assignments.get(name) or _bundle_assignment(name, info.fields)
        if assignment is None:
            raise AnalyticsRejected(
                f"field '{name}' has no operation: it is not part of a column's six-value bundle and the branch "
                f"configuration assigns it none (unassigned_field)", "unassigned_field")
        _check_operation(spec, assignment, info.fields)
        schema[name] = {"shape": list(spec.shape), "dtype": spec.dtype} | assignment.as_json()
    for name in assignments:
        if name not in info.fields:
            raise AnalyticsRejected(f"field '{name}' is missing: the branch configuration assigns it an operation, "
                                    f"so every payload carries it (field_missing)", "field_missing")
    return schema


def _bundle_assignment(name: str, fields: Mapping[str, FieldSpec]) -> Assignment | None:
    """The fixed combiner of a bundle entry, after checking its bundle is whole; None if not one."""
    stem, _, suffix = name.rpartition("_")
    if not stem or suffix not in BUNDLE_COMBINERS:
        return None
    for other in BUNDLE_SUFFIXES:
        if f"{stem}_{other}" not in fields:
            raise AnalyticsRejected(
                f"field '{stem}_{other}' is missing from column '{stem}''s bundle (a bundle has all six of "
                f"{', '.join(BUNDLE_SUFFIXES)}; assign '{name}' an operation if it is a field of its own) "
                f"(bundle_incomplete)", "bundle_incomplete")
    want = COUNT_DTYPE if suffix in BUNDLE_COUNT_SUFFIXES else VALUE_DTYPE
    spec = fields[name]
    if np.dtype(spec.dtype) != want:
        raise AnalyticsRejected(f"field '{name}' is {np.dtype(spec.dtype).name}, but a bundle's '_{suffix}' is "
                                f"{want.name} (dtype_mismatch)", "dtype_mismatch")
    if spec.shape != (1,):
        raise AnalyticsRejected(f"field '{name}' has shape {spec.shape}, but a bundle entry is one value, shape (1,) "
                                f"(shape_mismatch)", "shape_mismatch")
    return Assignment(BUNDLE_COMBINERS[suffix])


def _check_operation(spec: FieldSpec, assignment: Assignment, fields: Mapping[str, FieldSpec]) -> None:
    """Refuse a numeric operation on a string field, and a mean whose weight is not one count."""
    if assignment.op in _NUMERIC_OPERATIONS and spec.kind not in _NUMERIC_KINDS:
        raise AnalyticsRejected(f"field '{spec.name}' holds {_dtype_text(spec.dtype)} values, which '{assignment.op}' "
                                f"cannot combine (operation_dtype)", "operation_dtype")
    if assignment.weight is not None:
        weight = fields.get(assignment.weight)
        if weight is None:
            raise AnalyticsRejected(f"field '{assignment.weight}' is missing: '{spec.name}' is a mean weighted by it "
                                    f"(field_missing)", "field_missing")
        if weight.shape != (1,) or weight.kind not in "iuf":
            raise AnalyticsRejected(f"field '{assignment.weight}' weights the mean of '{spec.name}', so it must be one "
                                    f"number, shape (1,) (operation_dtype)", "operation_dtype")


def check_against(frozen: Mapping[str, dict[str, Any]], schema: Mapping[str, dict[str, Any]]) -> None:
    """Refuse a payload whose fields differ from the run's frozen ones, naming the first that does."""
    for name, want in frozen.items():
        have = schema.get(name)
        if have is None:
            raise AnalyticsRejected(f"field '{name}' is missing: this run's payloads all carry it (field_missing)",
                                    "field_missing")
        if _comparable(have["dtype"]) != _comparable(want["dtype"]):
            raise AnalyticsRejected(f"field '{name}' is {_dtype_text(have['dtype'])} but this run's payloads have "
                                    f"{_dtype_text(want['dtype'])} (dtype_mismatch)", "dtype_mismatch")
        if have["shape"] != want["shape"]:
            raise AnalyticsRejected(f"field '{name}' has shape {tuple(have['shape'])} but this run's payloads have "
                                    f"{tuple(want['shape'])} (shape_mismatch)", "shape_mismatch")
        if have.get("op") != want.get("op") or have.get("weight") != want.get("weight"):
            raise AnalyticsRejected(f"field '{name}' would combine by '{have.get('op')}' but this run combines it by "
                                    f"'{want.get('op')}' (operation_changed)", "operation_changed")
    for name in schema:
        if name not in frozen:
            raise AnalyticsRejected(f"field '{name}' is not among this run's fields, which the run's first payload "
                                    f"fixed (unexpected_field)", "unexpected_field")


def _comparable(dtype: str) -> str:
    """What must agree between sites: the dtype, except that strings of any length are one kind."""
    return np.dtype(dtype).kind if np.dtype(dtype).kind in "US" else dtype


def _dtype_text(dtype: str) -> str:
    return {"U": "string", "S": "bytes"}.get(np.dtype(dtype).kind, np.dtype(dtype).name)


def check_values(path: Path, schema: Mapping[str, dict[str, Any]], others: Sequence[Path]) -> None:
    """Refuse NaN or infinity in numeric fields, negative counts, and a `must_match` field whose
    value differs from the round's earlier payloads."""
    fields = _read(path)
    for name, rule in schema.items():
        value = fields[name]
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise AnalyticsRejected(f"field '{name}' holds NaN or infinity (non_finite)", "non_finite")
        if name.rpartition("_")[2] in BUNDLE_COUNT_SUFFIXES and rule["op"] == "sum" and (value < 0).any():
            raise AnalyticsRejected(f"field '{name}' is a negative count (negative_count)", "negative_count")
        weight = rule.get("weight")
        if weight and not float(fields[weight].reshape(-1)[0]) > 0:
            raise AnalyticsRejected(f"field '{weight}' weights the mean of '{name}', so it must be > 0 "
                                    f"(operation_dtype)", "operation_dtype")
    matched = [name for name, rule in schema.items() if rule["op"] == "must_match"]
    if matched and others:
        reference = _read(others[0])
        for name in matched:
            if not np.array_equal(reference[name], fields[name]):
                raise AnalyticsRejected(f"field '{name}' must match across sites and differs from this round's "
                                        f"earlier payloads (must_match)", "must_match")


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        return read_fields(path)
    except AnalyticsError as exc:
        raise AnalyticsRejected(f"archive rejected: {exc}", "malformed") from None


def combine(paths: Sequence[Path], schema: Mapping[str, dict[str, Any]], out: Path) -> Path:
    """Combine the round's payloads field by field into `out` (atomically): the combined result."""
    payloads = [read_fields(path) for path in paths]
    if not payloads:
        raise AnalyticsError("cannot combine a round with no payloads", None)
    combined: dict[str, np.ndarray] = {}
    for name, rule in schema.items():
        values = [payload[name] for payload in payloads]
        weights = [p[rule["weight"]] for p in payloads] if rule.get("weight") else []
        combined[name] = _combine_field(values, rule, weights)
    combined[PAYLOAD_KIND_KEY] = np.array(FEDERATED_ANALYTICS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as handle:
        np.savez(handle, **combined)  # type: ignore[arg-type]  # numpy's stub: a **kwds key could shadow allow_pickle
    return out


def _combine_field(values: list[np.ndarray], rule: Mapping[str, Any], weights: list[np.ndarray]) -> np.ndarray:
    """One field across sites by its operation; sums and means accumulate in 64 bits."""
    op = rule["op"]
    if op == "must_match":
        return values[0]
    stacked = np.stack(values)
    if op == "min":
        return stacked.min(axis=0)
    if op == "max":
        return stacked.max(axis=0)
    if op == "sum":
        kind = stacked.dtype.kind
        wide = np.int64 if kind in "ib" else np.uint64 if kind == "u" else np.float64
        return stacked.sum(axis=0, dtype=wide)
    w = np.array([float(weight.reshape(-1)[0]) for weight in weights], dtype=np.float64)
    if not w.sum() > 0:
        raise AnalyticsError(f"mean weighted by '{rule['weight']}' has a total weight of {w.sum()}", rule["weight"])
    return np.tensordot(w / w.sum(), stacked.astype(np.float64), axes=1)
