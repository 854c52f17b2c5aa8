"""The BranchKey `.npz` archive format: writing, reading, validation and refusals."""

from __future__ import annotations

import io
import re
import resource
import struct
import zipfile

import numpy as np
import pytest

from prefect_branchkey.bk_blocks.archive import (
    PAYLOAD_KIND_KEY,
    ArchiveTooLargeError,
    LayerError,
    NotAnArchiveError,
    NpzReader,
    PickledArrayError,
    UnsupportedPayloadError,
    WeightingError,
    inspect_update,
    read_aggregate,
    read_update,
    write_update,
)

LAYERS = [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.linspace(-2, 2, 10, dtype=np.float16),
    np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
    np.array([[True, False], [False, True]]),
]
WEIGHT = np.array([12.5])


def npz(path, *, compress=False, **arrays):
    """Write arrays as an .npz exactly as NumPy does, bypassing write_update's checks."""
    (np.savez_compressed if compress else np.savez)(path, **arrays)
    return path


def update(tmp_path, compress=False, **arrays):
    """An update archive with a valid weighting and one layer unless overridden."""
    arrays = {"weighting": WEIGHT, "layer_0": np.ones(4, dtype=np.float32), **arrays}
    arrays = {name: value for name, value in arrays.items() if value is not None}
    return npz(tmp_path / "u.npz", compress=compress, **arrays)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def npy_header(descr, shape):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def assert_same_layers(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


# --- round trips -------------------------------------------------------------------


def test_write_then_read_update_keeps_weighting_dtypes_shapes_and_values(tmp_path):
    path = write_update(tmp_path / "u.npz", 12.5, LAYERS)
    weighting, layers = read_update(path)
    assert weighting == 12.5
    assert_same_layers(layers, LAYERS)


def test_inspect_update_describes_weighting_kind_and_layers_in_order(tmp_path):
    path = write_update(tmp_path / "u.npz", 3, LAYERS)
    info = inspect_update(path)
    assert info.weighting == 3.0
    assert info.kind == "federated_learning"
    assert [spec.name for spec in info.layers] == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert [spec.shape for spec in info.layers] == [layer.shape for layer in LAYERS]
    assert [spec.dtype for spec in info.layers] == [layer.dtype for layer in LAYERS]
    assert info.data_bytes == sum(layer.nbytes for layer in LAYERS)


def test_write_update_stores_members_uncompressed_by_default(tmp_path):
    path = write_update(tmp_path / "u.npz", 1, LAYERS)
    assert all(spec.stored for spec in inspect_update(path).layers)
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


def test_write_update_with_compress_deflates_members_and_keeps_data(tmp_path):
    path = write_update(tmp_path / "u.npz", 1, LAYERS, compress=True)
    assert not any(spec.stored for spec in inspect_update(path).layers)
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert_same_layers(read_update(path)[1], LAYERS)


def test_fortran_ordered_layer_round_trips(tmp_path):
    layer = np.asfortranarray(np.arange(24, dtype=np.float64).reshape(4, 6))
    path = write_update(tmp_path / "u.npz", 1, [layer])
    assert inspect_update(path).layers[0].fortran_order
    assert_same_layers(read_update(path)[1], [layer])


# --- refusals ------------------------------------------------------------------------


def test_random_bytes_are_refused_as_not_an_archive(tmp_path):
    path = tmp_path / "u.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(NotAnArchiveError, match="not a readable zip"):
        inspect_update(path)


def test_zip_member_that_is_not_npy_is_refused(tmp_path):
    path = tmp_path / "u.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weighting.npy", npy_bytes(WEIGHT))
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(NotAnArchiveError, match=re.escape("'notes.txt' is not a top-level .npy")):
        inspect_update(path)


def test_object_array_is_refused_as_pickled(tmp_path):
    path = update(tmp_path, layer_0=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(PickledArrayError, match="'layer_0' is an object array"):
        inspect_update(path)


def test_missing_weighting_is_refused(tmp_path):
    path = update(tmp_path, weighting=None)
    with pytest.raises(WeightingError, match="missing 'weighting'"):
        inspect_update(path)


def test_weighting_of_two_values_is_refused(tmp_path):
    path = update(tmp_path, weighting=np.array([1.0, 2.0]))
    with pytest.raises(WeightingError, match=r"single value, got shape \(2,\)"):
        inspect_update(path)


@pytest.mark.parametrize("value", [0.0, -5.0, np.nan, np.inf], ids=["zero", "negative", "nan", "inf"])
def test_weighting_that_is_not_finite_and_positive_is_refused(tmp_path, value):
    path = update(tmp_path, weighting=np.array([value]))
    with pytest.raises(WeightingError, match="finite and > 0"):
        inspect_update(path)


def test_archive_without_layers_is_refused(tmp_path):
    path = update(tmp_path, layer_0=None)
    with pytest.raises(LayerError, match="no layers"):
        inspect_update(path)


def test_gap_in_layer_numbering_is_refused(tmp_path):
    path = update(tmp_path, layer_2=np.ones(3))
    with pytest.raises(LayerError, match="gap in layer numbering: layer_1 is missing"):
        inspect_update(path)


def test_nan_in_layer_is_refused(tmp_path):
    path = update(tmp_path, layer_0=np.array([1.0, np.nan, 3.0], dtype=np.float32))
    with pytest.raises(LayerError, match="layer_0 holds NaN or infinity"):
        inspect_update(path)


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_infinity_in_layer_is_refused(tmp_path, compress):
    layer = np.zeros(1000, dtype=np.float16)
    layer[777] = -np.inf
    path = update(tmp_path, compress=compress, layer_0=np.ones(2), layer_1=layer)
    with pytest.raises(LayerError, match="layer_1 holds NaN or infinity"):
        inspect_update(path)


def test_complex_layer_is_refused(tmp_path):
    path = update(tmp_path, layer_0=np.array([1 + 2j]))
    with pytest.raises(LayerError, match="layer_0 has dtype complex128"):
        inspect_update(path)


def test_string_layer_is_refused(tmp_path):
    path = update(tmp_path, layer_0=np.array(["abc"]))
    with pytest.raises(LayerError, match="layer_0 has dtype <U3"):
        inspect_update(path)


def test_unexpected_member_name_is_refused(tmp_path):
    path = update(tmp_path, optimizer_state=np.ones(2))
    with pytest.raises(LayerError, match=r"unexpected member.*optimizer_state"):
        inspect_update(path)


def test_archive_declaring_more_than_the_limit_is_refused_without_decompressing(tmp_path):
    # 50M float64 zeros: 400 MB declared, under 2 MB on disk.
    path = tmp_path / "big.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("weighting.npy", npy_bytes(WEIGHT))
        with archive.open("layer_0.npy", "w", force_zip64=True) as member:
            member.write(npy_header("<f8", (50_000_000,)))
            zeros = bytes(1 << 20)
            for _ in range(400_000_000 // len(zeros)):
                member.write(zeros)
            member.write(bytes(400_000_000 % len(zeros)))
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArchiveTooLargeError, match="400000264 bytes, over the limit of 100000000"):
        inspect_update(path, max_decompressed_bytes=100_000_000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib < 100 * 1024


def test_member_longer_than_its_npy_header_describes_is_refused(tmp_path):
    path = tmp_path / "u.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weighting.npy", npy_bytes(WEIGHT))
        archive.writestr("layer_0.npy", npy_header("<f8", (4,)) + bytes(10_000_000))
    with pytest.raises(NotAnArchiveError, match="'layer_0' holds 10000000 data bytes but its header describes 32"):
        inspect_update(path)


def test_central_directory_understating_member_size_is_refused(tmp_path):
    # A deflated member really holds 10 MB, but both zip headers claim 80 data bytes.
    path = tmp_path / "u.npz"
    header = npy_header("<f8", (10,))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("weighting.npy", npy_bytes(WEIGHT))
        archive.writestr("layer_0.npy", header + bytes(10_000_000))
        info = archive.getinfo("layer_0.npy")
    data = bytearray(path.read_bytes())
    claimed = len(header) + 80
    struct.pack_into("<L", data, info.header_offset + 22, claimed)  # local header file size
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(b"layer_0.npy"))
    struct.pack_into("<L", data, central + 24, claimed)  # central directory file size
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("layer_0.npy").file_size == claimed  # the lie is in place
    with pytest.raises(NotAnArchiveError, match=r"'layer_0'.*CRC"):
        inspect_update(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_archive_is_refused(tmp_path, keep):
    path = write_update(tmp_path / "u.npz", 1, LAYERS)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(NotAnArchiveError, match=re.escape("not an .npz archive")):
        inspect_update(path)


def test_flipped_byte_in_a_large_stored_layer_is_refused_by_its_crc(tmp_path):
    path = write_update(tmp_path / "u.npz", 1, [np.ones(10_000)])
    data = bytearray(path.read_bytes())
    offset = data.index(np.ones(1).tobytes() * 8) + 4000
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(NotAnArchiveError, match="CRC-32 mismatch"):
        inspect_update(path)


# --- payload kind (3.x) ----------------------------------------------------------------


def test_federated_learning_payload_kind_is_accepted_as_update(tmp_path):
    path = update(tmp_path, **{PAYLOAD_KIND_KEY: np.array("federated_learning")})
    assert inspect_update(path).kind == "federated_learning"
    weighting, layers = read_update(path)
    assert weighting == 12.5
    assert_same_layers(layers, [np.ones(4, dtype=np.float32)])


def test_federated_analytics_payload_kind_is_reported(tmp_path):
    path = npz(
        tmp_path / "a.npz",
        **{PAYLOAD_KIND_KEY: np.array("federated_analytics"), "age_n": np.array([3.0]), "age_sum": np.array([90.0])},
    )
    assert inspect_update(path).kind == "federated_analytics"


def test_unknown_payload_kind_is_refused(tmp_path):
    path = update(tmp_path, **{PAYLOAD_KIND_KEY: np.array("federated_magic")})
    with pytest.raises(UnsupportedPayloadError, match="unknown payload kind 'federated_magic'"):
        inspect_update(path)


def test_read_update_refuses_analytics_archive(tmp_path):
    path = npz(tmp_path / "a.npz", **{PAYLOAD_KIND_KEY: np.array("federated_analytics"), "age_n": np.array([3.0])})
    with pytest.raises(UnsupportedPayloadError, match="federated_analytics archive, not a model update"):
        read_update(path)


# --- aggregates ------------------------------------------------------------------------


def test_read_aggregate_reads_archive_of_layers_only(tmp_path):
    path = npz(tmp_path / "agg.npz", **{f"layer_{i}": layer for i, layer in enumerate(LAYERS)})
    assert_same_layers(read_aggregate(path), LAYERS)


def test_read_aggregate_refuses_nan_layer(tmp_path):
    path = npz(tmp_path / "agg.npz", layer_0=np.ones(3), layer_1=np.array([np.nan]))
    with pytest.raises(LayerError, match="layer_1 holds NaN or infinity"):
        read_aggregate(path)


# --- chunked reading -------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["stored", "deflated"])
def test_iter_chunks_yields_data_in_order_in_chunks_no_larger_than_asked(tmp_path, compress):
    layer = np.arange(1001, dtype=np.float64)
    path = npz(tmp_path / "u.npz", compress=compress, weighting=WEIGHT, layer_0=layer)
    with NpzReader(path) as reader:
        assert reader.members["layer_0"].stored is not compress
        chunks = [chunk.copy() for chunk in reader.iter_chunks("layer_0", chunk_bytes=100)]
    assert all(0 < chunk.nbytes <= 100 for chunk in chunks)
    assert len(chunks) > 10
    np.testing.assert_array_equal(np.concatenate(chunks), layer)


# --- writing ---------------------------------------------------------------------------


def test_write_update_refuses_nan_layer_before_writing_anything(tmp_path):
    with pytest.raises(LayerError, match="layer_1 holds NaN or infinity"):
        write_update(tmp_path / "u.npz", 1, [np.ones(2), np.array([np.nan], dtype=np.float32)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weighting", [0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_write_update_refuses_bad_weighting_before_writing_anything(tmp_path, weighting):
    with pytest.raises(WeightingError, match="finite and > 0"):
        write_update(tmp_path / "u.npz", weighting, [np.ones(2)])
    assert list(tmp_path.iterdir()) == []


def test_write_update_leaves_no_temporary_file_after_success(tmp_path):
    write_update(tmp_path / "u.npz", 1, LAYERS)
    write_update(tmp_path / "u.npz", 2, LAYERS)  # replacing an existing file too
    assert [p.name for p in tmp_path.iterdir()] == ["u.npz"]
    assert read_update(tmp_path / "u.npz")[0] == 2.0


def test_flipped_byte_in_a_stored_integer_layer_is_refused(tmp_path):
    path = write_update(tmp_path / "u.npz", 1, [np.ones(2, np.float32), np.full(10_000, 7, np.int64)])
    data = bytearray(path.read_bytes())
    offset = data.index(np.full(8, 7, np.int64).tobytes()) + 4000
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(NotAnArchiveError, match="CRC-32 mismatch"):
        inspect_update(path)


@pytest.mark.parametrize("shape", [(-1, 4), (2**32, 2**32)])
def test_impossible_shape_is_refused(tmp_path, shape):
    path = tmp_path / "u.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weighting.npy", npy_bytes(np.array([1.0])))
        archive.writestr("layer_0.npy", npy_header("<f4", shape))
    with pytest.raises(NotAnArchiveError):
        inspect_update(path)


def test_unsupported_compression_is_refused_as_not_an_archive(tmp_path):
    path = tmp_path / "u.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weighting.npy", npy_bytes(np.array([1.0])))
        archive.writestr("layer_0.npy", npy_bytes(np.ones(3)))
    data = bytearray(path.read_bytes())
    for signature in (b"PK\x03\x04", b"PK\x01\x02"):
        start = 0
        while (index := data.find(signature, start)) >= 0:
            method_at = index + (8 if signature == b"PK\x03\x04" else 10)
            data[method_at:method_at + 2] = (99).to_bytes(2, "little")
            start = index + 4
    path.write_bytes(bytes(data))
    with pytest.raises(NotAnArchiveError):
        inspect_update(path)
