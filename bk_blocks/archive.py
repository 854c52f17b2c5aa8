"""The BranchKey `.npz` archive format: write, inspect, validate and stream-read updates.

One module serves the client (which writes and checks an update before uploading it)
and the server (which validates uploads and streams them through FedAvg). An update
holds `weighting` (float64, one value) and `layer_0 .. layer_{n-1}`; an aggregate holds
only the layers. Archives are read without pickle, member by member and chunk by
chunk, so a hostile or huge archive never has to fit in memory.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from prefect_branchkey.bk_blocks.errors import (
    ArchiveError,
    ArchiveTooLargeError,
    LayerError,
    NotAnArchiveError,
    PickledArrayError,
    UnsupportedPayloadError,
    WeightingError,
)
from prefect_branchkey.bk_blocks.files import atomic_write

PAYLOAD_KIND_KEY = "__bk_payload_kind__"
FEDERATED_LEARNING = "federated_learning"
FEDERATED_ANALYTICS = "federated_analytics"
PAYLOAD_KINDS = (FEDERATED_LEARNING, FEDERATED_ANALYTICS)

DEFAULT_MAX_DECOMPRESSED_BYTES = 8 * 1024**3
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
MAX_MEMBERS = 100_000
_MAX_NPY_HEADER = 10_000
_LAYER_NAME = re.compile(r"^layer_(0|[1-9][0-9]*)$")
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
# Real numeric kinds a layer may hold: float, signed and unsigned integer, bool.
_LAYER_KINDS = "fiub"
# What `npz_size` adds to the data: a `.npy` header's fixed text (magic, length, dict keys, the
# growth padding numpy leaves, newline) before rounding to 64 bytes; a member's zip local header
# and central directory entry with their zip64 extras, besides its name twice; the end records.
_NPY_HEADER_FIXED = 100
_ZIP_MEMBER_BOUND = 30 + 20 + 46 + 28
_ZIP_END_BOUND = 22 + 56 + 20


@dataclass(frozen=True)
class MemberSpec:
    """Where one `.npy` member lives in an archive and what it holds."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_bytes: int
    stored: bool
    data_offset: int | None
    header_bytes: int
    crc: int

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class LayerSignature:
    """What a round compares between updates: a layer's shape and (byte-order-free) dtype."""

    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, spec: MemberSpec) -> LayerSignature:
        return cls(spec.shape, spec.dtype.newbyteorder("=").str)



@dataclass(frozen=True)
class UpdateInfo:
    """A validated update: its weighting, payload kind and layer members in order."""

    path: Path
    kind: str
    weighting: float
    layers: tuple[MemberSpec, ...]

    @property
    def signature(self) -> tuple[LayerSignature, ...]:
        return tuple(LayerSignature.of(spec) for spec in self.layers)

    @property
    def data_bytes(self) -> int:
        return sum(spec.data_bytes for spec in self.layers)


def write_update(
    path: str | os.PathLike[str],
    weighting: float,
    layers: Sequence[np.ndarray],
    *,
    compress: bool = False,
) -> Path:
    """Write an update archive atomically and return its path.

    Uncompressed by default: for float weights compression saves a few percent of the
    size and costs tens of times more CPU on both ends.
    """
    weighting = float(weighting)
    if not np.isfinite(weighting) or weighting <= 0:
        raise WeightingError(f"weighting must be finite and > 0, got {weighting!r}")
    if len(layers) == 0:
        raise LayerError("an update needs at least one layer")
    arrays = {"weighting": np.array([weighting], dtype=np.float64)}
    for index, layer in enumerate(layers):
        array = np.asarray(layer)
        _check_layer_dtype(f"layer_{index}", array.dtype)
        if array.dtype.kind == "f" and not all_finite(array):
            raise LayerError(f"layer_{index} holds NaN or infinity")
        arrays[f"layer_{index}"] = array
    return _write_npz_atomically(Path(path), arrays, compress=compress)


def all_finite(array: np.ndarray, chunk_elements: int = DEFAULT_CHUNK_BYTES // 4) -> bool:
    """Whether every element is finite, checked chunk by chunk: no temporary the layer's size."""
    flat = array.reshape(-1)
    return all(np.isfinite(flat[start:start + chunk_elements]).all() for start in range(0, flat.size, chunk_elements))


def npz_size(arrays: dict[str, np.ndarray]) -> int:
    """An upper bound on the bytes of the uncompressed `.npz` `np.savez` writes for `arrays` (within
    a few hundred bytes a member): the room a write needs, checked before its first byte."""
    total = _ZIP_END_BOUND
    for name, array in arrays.items():
        header = len(repr(np.lib.format.dtype_to_descr(array.dtype))) + len(repr(array.shape))
        npy_header = -(-(_NPY_HEADER_FIXED + header) // 64) * 64
        total += _ZIP_MEMBER_BOUND + 2 * len(name + ".npy") + npy_header + array.nbytes
    return total


def _write_npz_atomically(path: Path, arrays: dict[str, np.ndarray], *, compress: bool) -> Path:
    """Write `arrays` as an `.npz` through `atomic_write`; an uncompressed one (whose size is known
    beforehand) is refused at once, `DiskFullError`, when its disk has no room for it."""
    with atomic_write(path, size=None if compress else npz_size(arrays)) as handle:
        (np.savez_compressed if compress else np.savez)(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: a **kwds key could shadow allow_pickle
    return path


class NpzReader:
    """Read an `.npz` without pickle: member headers first, then data in bounded chunks.

    Stored (uncompressed) members are read straight from the file at their offset, with
    no zip-layer copies; deflated members are streamed through `zipfile`. CRC-32s are
    checked unless `verify_crc` is off (for archives already validated once).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
        verify_crc: bool = True,
    ) -> None:
        self.path = Path(path)
        self._verify_crc = verify_crc
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise NotAnArchiveError(f"not an .npz archive (not a readable zip file): {exc}") from exc
        try:
            assert self._zip.fp is not None  # a ZipFile opened from a path keeps its file open
            self._fd = self._zip.fp.fileno()
            self.members = self._inspect(max_decompressed_bytes)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _inspect(self, max_decompressed_bytes: int) -> dict[str, MemberSpec]:
        infos = self._zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ArchiveTooLargeError(f"archive has {len(infos)} members, more than {MAX_MEMBERS}")
        declared = sum(info.file_size for info in infos)
        if declared > max_decompressed_bytes:
            raise ArchiveTooLargeError(
                f"archive would decompress to {declared} bytes, over the limit of "
                f"{max_decompressed_bytes} bytes"
            )
        members: dict[str, MemberSpec] = {}
        for info in infos:
            name = self._member_name(info)
            if name in members:
                raise NotAnArchiveError(f"member {name!r} appears twice")
            members[name] = self._member_spec(info, name)
        return members

    @staticmethod
    def _member_name(info: zipfile.ZipInfo) -> str:
        if not info.filename.endswith(".npy") or "/" in info.filename:
            raise NotAnArchiveError(f"member {info.filename!r} is not a top-level .npy array")
        if info.flag_bits & 0x1:
            raise NotAnArchiveError(f"member {info.filename!r} is encrypted")
        return info.filename[: -len(".npy")]

    def _member_spec(self, info: zipfile.ZipInfo, name: str) -> MemberSpec:
        try:
            with self._zip.open(info) as stream:
                shape, fortran_order, dtype, header_len = _read_npy_header(stream, name)
        except (NotImplementedError, zlib.error, zipfile.BadZipFile, EOFError) as exc:
            raise NotAnArchiveError(f"member {name!r} cannot be read: {exc}") from None
        if any(n < 0 for n in shape):
            raise NotAnArchiveError(f"member {name!r} has a negative dimension in shape {shape}")
        count = math.prod(shape)
        data_bytes = count * dtype.itemsize
        if header_len + data_bytes != info.file_size:
            raise NotAnArchiveError(
                f"member {name!r} holds {info.file_size - header_len} data bytes but its "
                f"header describes {data_bytes}"
            )
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.compress_size != info.file_size:
            raise NotAnArchiveError(f"stored member {name!r} claims {info.file_size} bytes in {info.compress_size}")
        offset = _stored_data_offset(self._fd, info) + header_len if stored else None
        return MemberSpec(name, shape, dtype, fortran_order, data_bytes, stored, offset, header_len, info.CRC)

    def read_array(self, name: str) -> np.ndarray:
        """Read one whole member as an array (for small members and whole-layer reads)."""
        spec = self.members[name]
        flat = np.empty(spec.count, dtype=spec.dtype)
        position = 0
        for chunk in self.iter_chunks(name):
            flat[position : position + chunk.size] = chunk
            position += chunk.size
        order: Literal["F", "C"] = "F" if spec.fortran_order else "C"
        return flat.reshape(spec.shape, order=order)

    def iter_chunks(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Yield a member's data as flat arrays of at most `chunk_bytes`, in file order.

        Each chunk is a view into a reused buffer: use it before asking for the next.
        """
        spec = self.members[name]
        per_chunk = max(1, chunk_bytes // spec.dtype.itemsize)
        buffer = np.empty(min(per_chunk, spec.count) * spec.dtype.itemsize, dtype=np.uint8)
        with self.cursor(name) as cursor:
            while cursor.remaining:
                yield cursor.read(buffer, min(per_chunk, cursor.remaining))

    def cursor(self, name: str) -> MemberCursor:
        """A sequential reader of one member's elements into buffers the caller owns."""
        return MemberCursor(self, self.members[name])


class MemberCursor:
    """Reads a member's elements in order into a caller's buffer, so many members can be
    read side by side through one shared buffer (what streaming FedAvg does).

    Stored members are read with positional reads on the archive's descriptor (and their
    CRC-32 checked unless the reader was opened with `verify_crc=False`); deflated members
    go through `zipfile`, which checks their CRC itself.
    """

    def __init__(self, reader: NpzReader, spec: MemberSpec) -> None:
        self.spec = spec
        self.remaining = spec.count
        self._name = spec.name
        self._stream: IO[bytes] | None = None
        if spec.stored:
            assert spec.data_offset is not None
            self._fd = reader._fd
            self._offset = spec.data_offset
            self._crc: int | None = None
            if reader._verify_crc:
                self._crc = zlib.crc32(os.pread(self._fd, spec.header_bytes, spec.data_offset - spec.header_bytes))
        else:
            self._stream = reader._zip.open(spec.name + ".npy")
            _read_npy_header(self._stream, spec.name)

    def __enter__(self) -> MemberCursor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def read(self, buffer: np.ndarray, count: int) -> np.ndarray:
        """Read the next `count` elements into `buffer` (bytes) and return them as a view."""
        if count > self.remaining:
            raise LayerError(f"{self._name} has only {self.remaining} elements left, {count} asked")
        nbytes = count * self.spec.dtype.itemsize
        view = memoryview(buffer).cast("B")[:nbytes]  # type: ignore[arg-type]  # numpy declares ndarray.__buffer__ only for Python >= 3.12
        if self._stream is not None:
            _read_exactly(self._stream, view, self._name)
        else:
            self._pread(view)
        self.remaining -= count
        return np.frombuffer(view, dtype=self.spec.dtype, count=count)

    def _pread(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            got = os.preadv(self._fd, [view[filled:]], self._offset + filled)
            if not got:
                raise NotAnArchiveError(f"member {self._name!r} ends before its data does (truncated)")
            filled += got
        self._offset += filled
        if self._crc is not None:
            self._crc = zlib.crc32(view, self._crc)
            if not self.remaining - len(view) // self.spec.dtype.itemsize and self._crc != self.spec.crc:
                raise NotAnArchiveError(f"member {self._name!r} is corrupt (CRC-32 mismatch)")


def _read_exactly(stream: IO[bytes], view: memoryview, name: str) -> int:
    """Fill `view` from `stream`, raising if the member ends early (a truncated archive)."""
    filled = 0
    try:
        while filled < len(view):
            got = stream.readinto(view[filled:])  # type: ignore[attr-defined]
            if not got:
                raise NotAnArchiveError(f"member {name!r} ends before its data does (truncated)")
            filled += got
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as exc:
        raise NotAnArchiveError(f"member {name!r} is corrupt: {exc}") from exc
    return filled


# numpy parses a `.npy` header with `ast.literal_eval`, and CPython 3.11 before 3.11.8 builds ASTs
# with a recursion counter that threads share: parsed from several threads at once (leaves as Dask
# threads, bk-server's request threads) it raised "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905). Headers are parsed one at a time; each takes microseconds.
_HEADER_PARSE = threading.Lock()


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse a `.npy` header without ever allowing pickle; return shape, order, dtype, length."""
    try:
        version = np.lib.format.read_magic(stream)
        with _HEADER_PARSE:
            shape, fortran_order, dtype = _header_fields(stream, name, version)
    except (ValueError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise NotAnArchiveError(f"member {name!r} is not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise PickledArrayError(f"member {name!r} is an object array (pickled); pickles are never loaded")
    header_len = stream.tell()
    return tuple(int(n) for n in shape), bool(fortran_order), dtype, header_len


def _header_fields(stream: IO[bytes], name: str, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The header's shape, order and dtype, for the `.npy` versions numpy writes."""
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream, max_header_size=_MAX_NPY_HEADER)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(stream, max_header_size=_MAX_NPY_HEADER)
    raise NotAnArchiveError(f"member {name!r} has unsupported .npy version {version}")


def _stored_data_offset(fd: int, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's first byte: after its local header, name and extra field."""
    header = os.pread(fd, _ZIP_LOCAL_HEADER.size, info.header_offset)
    if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise NotAnArchiveError(f"member {info.filename!r} has a corrupt local header")
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len


def _check_layer_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise PickledArrayError(f"{name} is an object array; pickles are never loaded")
    if dtype.kind not in _LAYER_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise LayerError(f"{name} has dtype {dtype}, but layers must be real numeric (float, int, uint, bool)")


def _payload_kind(reader: NpzReader) -> str:
    if PAYLOAD_KIND_KEY not in reader.members:
        return FEDERATED_LEARNING
    spec = reader.members[PAYLOAD_KIND_KEY]
    if spec.dtype.kind != "U" or spec.count != 1:
        raise UnsupportedPayloadError(f"{PAYLOAD_KIND_KEY} must be a single string")
    kind = str(reader.read_array(PAYLOAD_KIND_KEY).reshape(()))
    if kind not in PAYLOAD_KINDS:
        raise UnsupportedPayloadError(
            f"unknown payload kind {kind!r} in {PAYLOAD_KIND_KEY}; expected one of {', '.join(PAYLOAD_KINDS)}"
        )
    return kind


def _read_weighting(reader: NpzReader) -> float:
    spec = reader.members.get("weighting")
    if spec is None:
        raise WeightingError("missing 'weighting': an update must carry its aggregation weight")
    if spec.count != 1:
        raise WeightingError(f"'weighting' must be a single value, got shape {spec.shape}")
    if spec.dtype.kind not in "fiu":
        raise WeightingError(f"'weighting' must be a real number, got dtype {spec.dtype}")
    value = float(reader.read_array("weighting").reshape(()))
    if not np.isfinite(value) or value <= 0:
        raise WeightingError(f"'weighting' must be finite and > 0, got {value!r}")
    return value


def _layer_specs(reader: NpzReader, *, allow: frozenset[str]) -> tuple[MemberSpec, ...]:
    names = [name for name in reader.members if name not in allow]
    unexpected = [name for name in names if not _LAYER_NAME.match(name)]
    if unexpected:
        raise LayerError(f"unexpected member(s) {', '.join(sorted(unexpected))}: only layer_<i> may follow")
    if not names:
        raise LayerError("no layers: the archive holds no layer_<i> arrays")
    indices = sorted(int(name.split("_", 1)[1]) for name in names)
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        raise LayerError(
            f"gap in layer numbering: layer_{missing[0]} is missing but layer_{indices[-1]} "
            f"is present (layers must be numbered from layer_0 without gaps)"
        )
    specs = tuple(reader.members[f"layer_{index}"] for index in indices)
    for spec in specs:
        _check_layer_dtype(spec.name, spec.dtype)
    return specs


def _check_values(reader: NpzReader, specs: Sequence[MemberSpec]) -> None:
    """Read every layer once: CRCs and lengths for all, NaN and infinity for float layers."""
    for spec in specs:
        for chunk in reader.iter_chunks(spec.name):
            if spec.dtype.kind == "f" and not np.isfinite(chunk).all():
                raise LayerError(f"{spec.name} holds NaN or infinity")


def inspect_update(
    path: str | os.PathLike[str],
    *,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    check_values: bool = True,
) -> UpdateInfo:
    """Validate an update archive and describe it; raise a specific `ArchiveError` if bad.

    With `check_values` every layer is read once, chunk by chunk (CRCs, truncation, and
    NaN or infinity in float layers); the structure is always checked.
    """
    with NpzReader(path, max_decompressed_bytes=max_decompressed_bytes) as reader:
        kind = _payload_kind(reader)
        if kind == FEDERATED_ANALYTICS:
            return UpdateInfo(Path(path), kind, 0.0, ())
        weighting = _read_weighting(reader)
        specs = _layer_specs(reader, allow=frozenset({"weighting", PAYLOAD_KIND_KEY}))
        if check_values:
            _check_values(reader, specs)
        return UpdateInfo(Path(path), kind, weighting, specs)


def read_update(
    path: str | os.PathLike[str], *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> tuple[float, list[np.ndarray]]:
    """Validate and load a federated-learning update: `(weighting, layers)`."""
    info = inspect_update(path, max_decompressed_bytes=max_decompressed_bytes)
    if info.kind != FEDERATED_LEARNING:
        raise UnsupportedPayloadError(f"{path} is a {info.kind} archive, not a model update")
    with NpzReader(path, max_decompressed_bytes=max_decompressed_bytes) as reader:
        return info.weighting, [reader.read_array(spec.name) for spec in info.layers]


def read_aggregate(
    path: str | os.PathLike[str], *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> list[np.ndarray]:
    """Validate and load an aggregate archive (layers only) as a list of arrays."""
    with NpzReader(path, max_decompressed_bytes=max_decompressed_bytes) as reader:
        specs = _layer_specs(reader, allow=frozenset())
        _check_values(reader, specs)
        return [reader.read_array(spec.name) for spec in specs]


def read_aggregate_into(path: str | os.PathLike[str], layers: Sequence[np.ndarray], *,
                        max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> None:
    """Validate an aggregate archive and load it into `layers` in place (each value cast to its
    layer's dtype), so a participant's model takes the global model without a second copy of it
    in memory. The layers must match in number, shape and kind (float, integer), and every value
    must fit its layer's dtype; nothing is written when the archive is refused. A C-ordered
    member goes into a contiguous layer chunk by chunk; any other pair through one layer-sized
    temporary."""
    with NpzReader(path, max_decompressed_bytes=max_decompressed_bytes) as reader:
        specs = _layer_specs(reader, allow=frozenset())
        if len(specs) != len(layers):
            raise LayerError(f"the aggregate has {len(specs)} layers, the model {len(layers)}")
        for spec, layer in zip(specs, layers, strict=True):
            _check_loadable(spec, layer)
        _check_values(reader, specs)
        _check_fits(reader, specs, layers)
        for spec, layer in zip(specs, layers, strict=True):
            if spec.fortran_order or not layer.flags.c_contiguous:
                layer[...] = reader.read_array(spec.name)
                continue
            flat, position = layer.reshape(-1), 0
            for chunk in reader.iter_chunks(spec.name):
                flat[position:position + chunk.size] = chunk
                position += chunk.size


def _check_loadable(spec: MemberSpec, layer: np.ndarray) -> None:
    """Refuse a model layer the member cannot be loaded into: another shape or kind, or read-only."""
    if tuple(spec.shape) != tuple(layer.shape):
        raise LayerError(f"{spec.name}: the aggregate's shape is {tuple(spec.shape)}, the model's {tuple(layer.shape)}")
    if (spec.dtype.kind == "f") != (layer.dtype.kind == "f"):
        raise LayerError(f"{spec.name}: the aggregate holds {spec.dtype}, the model's layer is {layer.dtype}")
    if not layer.flags.writeable:
        raise LayerError(f"{spec.name}: the model's array is read-only")


def _check_fits(reader: NpzReader, specs: Sequence[MemberSpec], layers: Sequence[np.ndarray]) -> None:
    """Refuse a float member whose values overflow a narrower float layer (they would load as infinity)."""
    for spec, layer in zip(specs, layers, strict=True):
        if spec.dtype.kind == "f" and layer.dtype.itemsize < spec.dtype.itemsize:
            limit = float(np.finfo(layer.dtype).max)
            if any(float(np.abs(chunk).max(initial=0.0)) > limit for chunk in reader.iter_chunks(spec.name)):
                raise LayerError(f"{spec.name}: values beyond {layer.dtype}'s range, the model's dtype")


class AggregateLayers:
    """An aggregate's layers read from its archive on demand, never held in memory: what the
    update transforms compare an update with. Open it as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *,
                 max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> None:
        self._reader = NpzReader(path, max_decompressed_bytes=max_decompressed_bytes)
        try:
            self.layers = _layer_specs(self._reader, allow=frozenset())
        except BaseException:
            self._reader.close()
            raise

    def __enter__(self) -> AggregateLayers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reader.close()

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> MemberSpec:
        return self.layers[index]

    def c_chunks(self, index: int, elements: int) -> Iterator[np.ndarray]:
        """Layer `index`'s values in C order (as `ndarray.reshape(-1)` flattens), as flat chunks of
        `elements`: views of one reused buffer, so use each before asking for the next. A
        Fortran-ordered member is read whole and reordered (one layer-sized temporary)."""
        spec = self.layers[index]
        if spec.fortran_order:
            flat = np.ascontiguousarray(self._reader.read_array(spec.name)).reshape(-1)
            return (flat[start:start + elements] for start in range(0, flat.size, elements))
        return self._reader.iter_chunks(spec.name, chunk_bytes=elements * spec.dtype.itemsize)


def inspect_aggregate(
    path: str | os.PathLike[str], *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> tuple[MemberSpec, ...]:
    """Check an aggregate's structure and return its layer members, without loading data."""
    with NpzReader(path, max_decompressed_bytes=max_decompressed_bytes) as reader:
        return _layer_specs(reader, allow=frozenset())
