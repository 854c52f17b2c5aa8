"""Uploads: multipart from both client generations, integrity headers, refusals, idempotency."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests

from ..support.bkserver import BkServer
from ..support.wire import chunked_multipart, file_id_of, headers, upload


def accepted_count(server: BkServer, branch_id: str, round_number: int = 1) -> int:
    rounds = {r["round"]: r for r in server.status(branch_id)["rounds"]}
    return rounds[round_number]["updates"]


def test_upload_from_3x_client_with_integrity_headers_is_201(server: BkServer,
                                                             update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    response = upload(server, federation.leaves[0], update_file())
    assert response.status_code == 201
    assert len(response.json()["data"]["file_id"]) == 36


def test_upload_from_2x_client_with_python_looking_metadata_is_201(server: BkServer,
                                                                   update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    response = upload(server, federation.leaves[0], update_file(), v3=False)
    assert response.status_code == 201, response.text


def test_upload_with_wrong_digest_is_refused(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    bad = "sha256=" + "A" * 43 + "="
    response = upload(server, federation.leaves[0], update_file(), extra_headers={"x-bk-file-digest": bad})
    assert response.status_code == 400
    assert "x-bk-file-digest" in response.json()["error"]
    assert accepted_count(server, federation.branch_id) == 0


def test_upload_with_wrong_size_header_is_refused(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=2)
    response = upload(server, federation.leaves[0], update_file(), extra_headers={"x-bk-file-size": "12"})
    assert response.status_code == 400
    assert "x-bk-file-size" in response.json()["error"]


def test_upload_without_file_part_is_refused(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    response = requests.post(f"{server.url}/api/v1/file/upload", headers=headers(leaf),
                             files={"data": (None, "{}")}, timeout=10)
    assert response.status_code == 400
    assert "'file' part" in response.json()["error"]


def test_upload_that_is_not_multipart_is_refused(server: BkServer) -> None:
    leaf = server.federation(leaves=1).leaves[0]
    response = requests.post(f"{server.url}/api/v1/file/upload", headers=headers(leaf), data=b"xx", timeout=10)
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["error"]


def _object_array(path: Path) -> None:
    np.savez(path, weighting=np.array([1.0]), layer_0=np.array([{"a": 1}], dtype=object))


BAD_ARCHIVES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not_a_zip": (lambda p: p.write_bytes(b"definitely not a zip"), "not an .npz"),
    "pickled_object_array": (_object_array, "pickle"),
    "missing_weighting": (lambda p: np.savez(p, layer_0=np.ones(3)), "weighting"),
    "weighting_not_scalar": (lambda p: np.savez(p, weighting=np.ones(2), layer_0=np.ones(3)), "single value"),
    "weighting_zero": (lambda p: np.savez(p, weighting=np.array([0.0]), layer_0=np.ones(3)), "> 0"),
    "weighting_nan": (lambda p: np.savez(p, weighting=np.array([np.nan]), layer_0=np.ones(3)), "finite"),
    "no_layers": (lambda p: np.savez(p, weighting=np.array([1.0])), "no layers"),
    "gap_in_layers": (lambda p: np.savez(p, weighting=np.array([1.0]), layer_0=np.ones(2), layer_2=np.ones(2)),
                      "layer_1 is missing"),
    "nan_in_layer": (lambda p: np.savez(p, weighting=np.array([1.0]), layer_0=np.array([1.0, np.nan])), "NaN"),
    "inf_in_layer": (lambda p: np.savez_compressed(p, weighting=np.array([1.0]), layer_0=np.array([np.inf])),
                     "infinity"),
    "zip_bomb": (lambda p: np.savez_compressed(p, weighting=np.array([1.0]), layer_0=np.zeros(40_000_000)),
                 "over the limit"),
    "analytics": (lambda p: np.savez(p, __bk_payload_kind__=np.array("federated_analytics"), age_sum=np.ones(1)),
                  "field 'age_n' is missing from column 'age'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_ARCHIVES))
def test_bad_archive_is_refused_with_a_message_naming_the_problem(
    make_server: Callable[..., BkServer], update_file: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    server = make_server(max_decompressed_bytes=100_000_000)
    federation = server.federation(leaves=2)
    write, words = BAD_ARCHIVES[kind]
    path = tmp_path / f"{kind}.npz"
    write(path)
    response = upload(server, federation.leaves[0], path)
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]
    assert accepted_count(server, federation.branch_id) == 0
    assert file_id_of(upload(server, federation.leaves[0], update_file())), "server keeps serving"
    assert list((server.data_dir / "incoming").iterdir()) == [], "refused uploads leave nothing behind"


def test_upload_over_size_limit_is_413(make_server: Callable[..., BkServer], update_file: Callable[..., Path]) -> None:
    server = make_server(max_upload_bytes=1000)
    leaf = server.federation(leaves=1).leaves[0]
    response = upload(server, leaf, update_file())
    assert response.status_code == 413
    assert "limit of 1000 bytes" in response.json()["error"]


def test_upload_disagreeing_in_shape_is_refused_and_round_untouched(
    server: BkServer, update_file: Callable[..., Path], model: Callable[[int], list[np.ndarray]]
) -> None:
    federation = server.federation(leaves=3)
    file_id_of(upload(server, federation.leaves[0], update_file(0)))
    layers = model(1)
    layers[0] = np.ones((4, 4), dtype=np.float32)
    response = upload(server, federation.leaves[1], update_file(layers=layers))
    assert response.status_code == 422
    assert "layer_0 is shape (4, 4)" in response.json()["error"]
    assert accepted_count(server, federation.branch_id) == 1


def test_upload_disagreeing_in_dtype_is_refused(
    server: BkServer, update_file: Callable[..., Path], model: Callable[[int], list[np.ndarray]]
) -> None:
    federation = server.federation(leaves=3)
    file_id_of(upload(server, federation.leaves[0], update_file(0)))
    layers = model(1)
    layers[2] = layers[2].astype(np.int32)
    response = upload(server, federation.leaves[1], update_file(layers=layers))
    assert response.status_code == 422
    assert "layer_2" in response.json()["error"] and "int32" in response.json()["error"]


def test_upload_with_fewer_layers_is_refused(
    server: BkServer, update_file: Callable[..., Path], model: Callable[[int], list[np.ndarray]]
) -> None:
    federation = server.federation(leaves=3)
    file_id_of(upload(server, federation.leaves[0], update_file(0)))
    response = upload(server, federation.leaves[1], update_file(layers=model(1)[:2]))
    assert response.status_code == 422
    assert "has 2 layers" in response.json()["error"]


def test_same_idempotency_key_returns_same_file_id_and_counts_once(server: BkServer,
                                                                   update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    path = update_file()
    key = {"Idempotency-Key": "leaf-1-round-1-abc"}
    first = file_id_of(upload(server, federation.leaves[0], path, extra_headers=key))
    second = file_id_of(upload(server, federation.leaves[0], path, extra_headers=key))
    assert first == second
    assert accepted_count(server, federation.branch_id) == 1


def test_idempotency_key_reused_for_another_archive_is_refused(server: BkServer,
                                                               update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    key = {"Idempotency-Key": "k1"}
    file_id_of(upload(server, federation.leaves[0], update_file(1), extra_headers=key))
    response = upload(server, federation.leaves[0], update_file(2), extra_headers=key)
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["error"]


def test_later_upload_by_same_leaf_replaces_earlier(server: BkServer, update_file: Callable[..., Path]) -> None:
    federation = server.federation(leaves=3)
    first = file_id_of(upload(server, federation.leaves[0], update_file(1)))
    second = file_id_of(upload(server, federation.leaves[0], update_file(2)))
    assert first != second
    assert accepted_count(server, federation.branch_id) == 1
    assert not (server.data_dir / "files" / "uploads" / f"{first}.npz").exists()


def test_streamed_upload_of_1_gb_is_not_held_in_server_memory(make_server: Callable[..., BkServer],
                                                               tmp_path: Path) -> None:
    server = make_server()  # its own: a shared server's peak would already hold the other tests' uploads
    leaf = server.federation(leaves=2).leaves[0]
    path = tmp_path / "big.npz"
    np.savez(path, weighting=np.array([1.0]), layer_0=np.zeros(2**27, dtype=np.float64))
    before = server.peak_rss_bytes()
    content_type, body = chunked_multipart(path, leaf["name"])
    response = requests.post(f"{server.url}/api/v1/file/upload", data=body, timeout=600,
                             headers=headers(leaf) | {"Content-Type": content_type})
    assert response.status_code == 201, response.text
    grown = server.peak_rss_bytes() - before
    assert grown < 200 * 1024**2, f"server peak RSS grew by {grown / 1024**2:.0f} MB for a 1 GB upload"


def test_metadata_is_free_text_but_data_must_be_json(server: BkServer, update_file: Callable[..., Path]) -> None:
    leaf = server.federation(leaves=2).leaves[0]
    with open(update_file(), "rb") as handle:
        response = requests.post(f"{server.url}/api/v1/file/upload", headers=headers(leaf), timeout=30,
                                 files={"file": handle}, data={"data": "{'leaf_name': 'x'}"})
    assert response.status_code == 400
    assert "'data' must be a JSON object" in response.json()["error"]
    ok = upload(server, leaf, update_file(), metadata=json.dumps({"nested": {"x": 1}}))
    assert ok.status_code == 201
