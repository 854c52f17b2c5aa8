"""Streaming federated averaging: `sum_i(w_i * theta_i) / sum_i(w_i)`, chunk by chunk.

Plain FedAvg (Flower's `aggregate`, for one) loads every update and scales each one,
so memory grows with the number of leaves. Here the weightings are normalised first
(so float16 layers with large sample counts cannot overflow), and the layer is built
window by window: each update's elements of the window are read, one update after the
other, through one shared buffer into one float64 accumulator, which is then written
out in the layer's own dtype. Peak memory is a few windows, whatever the number of
leaves or the size of the model.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from prefect_branchkey.bk_blocks.archive import (
    DEFAULT_CHUNK_BYTES,
    MemberCursor,
    MemberSpec,
    NpzReader,
)
from prefect_branchkey.bk_blocks.files import atomic_write


class AggregationError(RuntimeError):
    """The round's updates cannot be averaged (they disagree, or there are none)."""


@dataclass(frozen=True)
class WeightedUpdate:
    """One accepted update of a round: its archive and its aggregation weight."""

    path: Path
    weighting: float


def normalised_weights(weightings: Sequence[float]) -> np.ndarray:
    """Turn raw weightings into coefficients summing to one, in float64 (scaled by the largest
    first, so that huge weightings cannot overflow their sum)."""
    weights = np.asarray(weightings, dtype=np.float64)
    if weights.size == 0:
        raise AggregationError("cannot aggregate a round with no updates")
    if not np.isfinite(weights).all() or (weights <= 0).any():
        raise AggregationError("every weighting must be finite and > 0")
    weights = weights / weights.max()
    return weights / weights.sum()


def fedavg(
    updates: Sequence[WeightedUpdate],
    out_path: str | os.PathLike[str],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_layer: Callable[[int], None] | None = None,
) -> Path:
    """Average the updates' layers into an aggregate archive at `out_path` (atomically).

    `on_layer(index)` is called after each layer is written (progress of a large model; the
    platform's crash point for the fault suite).

    Float layers come back in their own dtype; integer and bool layers are rounded
    to the nearest value of their dtype rather than silently turned into float64.
    The updates were validated (CRCs included) when they were accepted, so they are
    not checked again here.
    """
    coefficients = normalised_weights([update.weighting for update in updates])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        readers = [stack.enter_context(NpzReader(update.path, verify_crc=False)) for update in updates]
        layer_specs = _agreed_layers(readers)
        with atomic_write(out_path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
            for index, spec in enumerate(layer_specs):
                _write_layer(out, f"layer_{index}", spec, readers, coefficients, chunk_bytes)
                if on_layer is not None:
                    on_layer(index)
    return Path(out_path)


def _agreed_layers(readers: Sequence[NpzReader]) -> list[MemberSpec]:
    """The first update's layers, after checking every other update has the same ones."""
    def layers_of(reader: NpzReader) -> list[MemberSpec]:
        count = sum(1 for name in reader.members if name.startswith("layer_"))
        return [reader.members[f"layer_{i}"] for i in range(count)]

    reference = layers_of(readers[0])
    for reader in readers[1:]:
        layers = layers_of(reader)
        if len(layers) != len(reference):
            raise AggregationError(f"{reader.path.name} has {len(layers)} layers, expected {len(reference)}")
        for ours, theirs in zip(reference, layers, strict=True):
            if ours.shape != theirs.shape or ours.dtype.newbyteorder("=") != theirs.dtype.newbyteorder("="):
                raise AggregationError(
                    f"{reader.path.name} {theirs.name} is {theirs.shape} {theirs.dtype}, "
                    f"expected {ours.shape} {ours.dtype}"
                )
    return reference


def _write_layer(
    out: zipfile.ZipFile,
    name: str,
    spec: MemberSpec,
    readers: Sequence[NpzReader],
    coefficients: np.ndarray,
    chunk_bytes: int,
) -> None:
    """Average one layer window by window: every update is read through one shared buffer."""
    dtype = spec.dtype.newbyteorder("=")
    window = max(1, min(chunk_bytes // 8, spec.count))
    acc = np.empty(window, dtype=np.float64)
    scaled = np.empty(window, dtype=np.float64)
    raw = np.empty(window * spec.dtype.itemsize, dtype=np.uint8)
    result = np.empty(window, dtype=dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": spec.fortran_order, "shape": spec.shape}
    with ExitStack() as stack, out.open(name + ".npy", "w", force_zip64=True) as member:
        _write_npy_header(member, header)
        cursors: list[MemberCursor | _ReorderedLayer] = []
        for reader in readers:
            cursor = _cursor(reader, name, spec.fortran_order)
            stack.enter_context(cursor)  # returns the cursor itself
            cursors.append(cursor)
        remaining = spec.count
        while remaining:
            n = min(remaining, window)
            total, tmp, out_values = acc[:n], scaled[:n], result[:n]
            np.multiply(cursors[0].read(raw, n), coefficients[0], out=total)
            for cursor, coefficient in zip(cursors[1:], coefficients[1:], strict=True):
                np.multiply(cursor.read(raw, n), coefficient, out=tmp)
                total += tmp
            _cast_into(total, out_values)
            member.write(memoryview(out_values).cast("B"))  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ only for Python >= 3.12
            remaining -= n


def _write_npy_header(member: IO[bytes], header: dict) -> None:
    """Write a `.npy` header in format 1.0, or 2.0 when the shape is too long for 1.0."""
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(member, header)


def _cast_into(values: np.ndarray, out: np.ndarray) -> None:
    """Cast averaged float64 values into a layer's dtype, rounding integers and bools."""
    kind = out.dtype.kind
    if kind == "f":
        np.copyto(out, values, casting="same_kind")
    elif kind == "b":
        np.greater_equal(values, 0.5, out=out)
    else:
        info = np.iinfo(out.dtype)
        upper = np.float64(info.max)
        if int(upper) > info.max:
            upper = np.nextafter(upper, 0)
        np.rint(values, out=values)
        np.clip(values, info.min, upper, out=values)
        np.copyto(out, values, casting="unsafe")


def _cursor(reader: NpzReader, name: str, fortran_order: bool) -> MemberCursor | _ReorderedLayer:
    """A cursor over a member's elements in the aggregate's memory order."""
    spec = reader.members[name]
    if spec.fortran_order == fortran_order:
        return reader.cursor(name)
    return _ReorderedLayer(np.ravel(reader.read_array(name), order="F" if fortran_order else "C"))


class _ReorderedLayer:
    """A whole layer held in memory, for the rare update stored in the other memory order."""

    def __init__(self, flat: np.ndarray) -> None:
        self._flat = flat
        self._position = 0

    def __enter__(self) -> _ReorderedLayer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._flat = self._flat[:0]

    def read(self, buffer: np.ndarray, count: int) -> np.ndarray:
        chunk = self._flat[self._position : self._position + count]
        self._position += count
        return chunk
