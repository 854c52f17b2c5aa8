"""Streaming federated averaging: `sum_i(w_i * theta_i) / sum_i(w_i)`, chunk by chunk.

Plain FedAvg (Flower's `aggregate`, for one) loads every update and scales each one,
so memory grows with the number of leaves. Here the weightings are normalised first
(so float16 layers with large sample counts cannot overflow), every update is read
in the same element range at once, and one float64 chunk accumulates the range before
it is written out in the layer's own dtype. Peak memory is a few chunks, whatever the
number of leaves or the size of the model.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bk_blocks.archive import (
    DEFAULT_CHUNK_BYTES,
    LayerError,
    MemberSpec,
    NpzReader,
)


class AggregationError(RuntimeError):
    """The round's updates cannot be averaged (they disagree, or there are none)."""


@dataclass(frozen=True)
class WeightedUpdate:
    """One accepted update of a round: its archive and its aggregation weight."""

    path: Path
    weighting: float


def normalised_weights(weightings: Sequence[float]) -> np.ndarray:
    """Turn raw weightings into coefficients summing to one, computed in float64."""
    weights = np.asarray(weightings, dtype=np.float64)
    if weights.size == 0:
        raise AggregationError("cannot aggregate a round with no updates")
    if not np.isfinite(weights).all() or (weights <= 0).any():
        raise AggregationError("every weighting must be finite and > 0")
    return weights / weights.sum()


def fedavg(
    updates: Sequence[WeightedUpdate],
    out_path: str | os.PathLike[str],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Path:
    """Average the updates' layers into an aggregate archive at `out_path` (atomically).

    Float layers come back in their own dtype; integer and bool layers are rounded
    to the nearest value of their dtype rather than silently turned into float64.
    The updates were validated (CRCs included) when they were accepted, so they are
    not checked again here.
    """
    coefficients = normalised_weights([update.weighting for update in updates])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with ExitStack() as stack:
            readers = [stack.enter_context(NpzReader(update.path, verify_crc=False)) for update in updates]
            layer_specs = _agreed_layers(readers)
            with zipfile.ZipFile(tmp_name, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
                for index, spec in enumerate(layer_specs):
                    _write_layer(out, f"layer_{index}", spec, readers, coefficients, chunk_bytes)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


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
        for ours, theirs in zip(reference, layers):
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
    dtype = spec.dtype.newbyteorder("=")
    per_chunk = max(1, chunk_bytes // 8)
    acc = np.empty(min(per_chunk, max(spec.count, 1)), dtype=np.float64)
    scaled = np.empty_like(acc)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": spec.fortran_order, "shape": spec.shape}
    with out.open(name + ".npy", "w", force_zip64=True) as member:
        _write_npy_header(member, header)
        streams = [
            _ElementStream(reader, reader.members[name], spec.fortran_order, chunk_bytes) for reader in readers
        ]
        remaining = spec.count
        while remaining:
            n = min(remaining, acc.size)
            window, tmp = acc[:n], scaled[:n]
            np.multiply(streams[0].take(n), coefficients[0], out=window)
            for stream, coefficient in zip(streams[1:], coefficients[1:]):
                np.multiply(stream.take(n), coefficient, out=tmp)
                window += tmp
            member.write(_to_dtype(window, dtype).tobytes())
            remaining -= n


def _write_npy_header(member: object, header: dict) -> None:
    """Write a `.npy` header in format 1.0, or 2.0 when the shape is too long for 1.0."""
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(member, header)


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast averaged float64 values back to a layer's dtype, rounding integers and bools."""
    if dtype.kind == "f":
        return values.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    info = np.iinfo(dtype)
    upper = np.float64(info.max)
    if int(upper) > info.max:
        upper = np.nextafter(upper, 0)
    return np.clip(np.rint(values), info.min, upper).astype(dtype)


class _ElementStream:
    """Hands out a member's elements in order, `n` at a time, in a given memory order."""

    def __init__(self, reader: NpzReader, spec: MemberSpec, fortran_order: bool, chunk_bytes: int) -> None:
        if spec.fortran_order == fortran_order:
            self._chunks: Iterator[np.ndarray] = reader.iter_chunks(spec.name, chunk_bytes)
        else:
            order = "F" if fortran_order else "C"
            self._chunks = iter([np.ravel(reader.read_array(spec.name), order=order)])
        self._current = np.empty(0, dtype=spec.dtype)
        self._position = 0
        self._gather = np.empty(0, dtype=spec.dtype)

    def take(self, n: int) -> np.ndarray:
        """Return the next `n` elements (a view valid until the next call)."""
        available = self._current.size - self._position
        if available >= n:
            out = self._current[self._position : self._position + n]
            self._position += n
            return out
        if self._gather.size < n:
            self._gather = np.empty(n, dtype=self._current.dtype)
        filled = 0
        while filled < n:
            if self._position >= self._current.size:
                try:
                    self._current = next(self._chunks)
                except StopIteration:
                    raise LayerError("update ended before its layer did") from None
                self._position = 0
            step = min(n - filled, self._current.size - self._position)
            self._gather[filled : filled + step] = self._current[self._position : self._position + step]
            self._position += step
            filled += step
        return self._gather[:n]
