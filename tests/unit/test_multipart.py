"""The streaming multipart/form-data parser, fed bodies built by `requests`."""

from __future__ import annotations

import json
import random

import pytest
import requests

from prefect_branchkey.bk_server.multipart import MultipartError, MultipartParser, boundary_of, part_name

FILE_DATA = bytes(range(256)) * 40 + b"\r\n--\r\n\r\n" + b"tail"
DATA_JSON = json.dumps({"leaf_name": "leaf-1", "metadata": "{'key1':'value1'}"})


class Part:
    """A sink that records a part's headers, bytes and whether it was closed."""

    def __init__(self, headers):
        self.headers = headers
        self.chunks = []
        self.closed = False

    def write(self, data):
        assert not self.closed
        self.chunks.append(data)

    def close(self):
        self.closed = True

    @property
    def data(self):
        return b"".join(self.chunks)


def upload_body(file_data=FILE_DATA):
    """The bytes and Content-Type of a BranchKey upload, as `requests` sends them."""
    prepared = requests.Request(
        "POST", "http://x", files={"file": ("a.npz", file_data)}, data={"data": DATA_JSON}
    ).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def parse(body, content_type, chunk_sizes):
    """Feed `body` in pieces of the given sizes (cycled), close, and return the parts."""
    parts = []

    def open_part(headers):
        parts.append(Part(headers))
        return parts[-1]

    parser = MultipartParser(boundary_of(content_type), open_part)
    position, sizes = 0, iter(chunk_sizes)
    while position < len(body):
        size = next(sizes)
        parser.feed(body[position : position + size])
        position += size
    parser.close()
    return parts


def by_name(parts):
    return {part_name(part.headers)[0]: part for part in parts}


def assert_upload_parts(parts, file_data=FILE_DATA):
    assert all(part.closed for part in parts)
    named = by_name(parts)
    assert set(named) == {"file", "data"}
    assert part_name(named["file"].headers) == ("file", "a.npz")
    assert named["file"].data == file_data
    assert named["data"].data.decode() == DATA_JSON


def random_sizes(seed, low=1, high=300):
    rng = random.Random(seed)
    while True:
        yield rng.randint(low, high)


def endless(size):
    while True:
        yield size


# --- parsing --------------------------------------------------------------------------


def test_body_fed_in_one_piece_is_split_into_its_parts():
    body, content_type = upload_body()
    assert_upload_parts(parse(body, content_type, [len(body)]))


def test_body_fed_byte_by_byte_is_split_into_its_parts():
    body, content_type = upload_body()
    assert_upload_parts(parse(body, content_type, endless(1)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_body_fed_in_random_chunks_is_split_into_its_parts(seed):
    body, content_type = upload_body()
    assert_upload_parts(parse(body, content_type, random_sizes(seed)))


@pytest.mark.parametrize("short_by", [1, 2, 5])
@pytest.mark.parametrize("feed", ["whole", "bytewise", "random"])
def test_file_bytes_resembling_the_boundary_are_kept_intact(short_by, feed):
    placeholder = b"@@NEAR-BOUNDARY@@"
    body, content_type = upload_body(b"x" * 100 + placeholder + b"y" * 50 + placeholder)
    near = b"\r\n--" + boundary_of(content_type)[:-short_by]
    body = body.replace(placeholder, near)
    sizes = {"whole": [len(body)], "bytewise": endless(1), "random": random_sizes(7, 1, 40)}[feed]
    parts = parse(body, content_type, sizes)
    assert by_name(parts)["file"].data == b"x" * 100 + near + b"y" * 50 + near


def test_body_missing_its_closing_boundary_is_refused_on_close():
    body, content_type = upload_body()
    closing = b"--" + boundary_of(content_type) + b"--"
    assert body.rstrip().endswith(closing)
    with pytest.raises(MultipartError, match="ended before its closing boundary"):
        parse(body[: body.rindex(closing)], content_type, [len(body)])


def test_body_cut_inside_a_part_is_refused_on_close():
    body, content_type = upload_body()
    with pytest.raises(MultipartError, match="ended before its closing boundary"):
        parse(body[: len(body) // 2], content_type, endless(64))


# --- header limits ---------------------------------------------------------------------


def long_header_body():
    content_type = "multipart/form-data; boundary=b0undary"
    body = (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.npz"\r\n'
        b"X-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
        b"payload\r\n--b0undary--\r\n"
    )
    return body, content_type


def test_part_headers_too_long_are_refused_when_fed_in_small_chunks():
    body, content_type = long_header_body()
    with pytest.raises(MultipartError, match="headers too long"):
        parse(body, content_type, endless(1024))


def test_part_headers_too_long_are_refused_when_fed_in_one_piece():
    body, content_type = long_header_body()
    with pytest.raises(MultipartError, match="headers too long"):
        parse(body, content_type, [len(body)])


# --- boundary_of and part_name -------------------------------------------------------------


def test_boundary_of_reads_the_boundary_requests_chose():
    body, content_type = upload_body()
    boundary = boundary_of(content_type)
    assert body.startswith(b"--" + boundary + b"\r\n")


def test_boundary_of_reads_a_quoted_boundary():
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="a b:c"') == b"a b:c"


def test_boundary_of_refuses_a_non_multipart_content_type():
    with pytest.raises(MultipartError, match="must be multipart/form-data"):
        boundary_of("application/json")


def test_boundary_of_refuses_a_missing_content_type():
    with pytest.raises(MultipartError, match="must be multipart/form-data"):
        boundary_of(None)


def test_boundary_of_refuses_multipart_without_a_boundary():
    with pytest.raises(MultipartError, match="without a boundary"):
        boundary_of("multipart/form-data; charset=utf-8")


def test_part_name_reads_name_and_filename():
    headers = {"content-disposition": 'form-data; name="file"; filename="model; v2.npz"'}
    assert part_name(headers) == ("file", "model; v2.npz")


def test_part_name_of_a_field_without_filename_has_none():
    assert part_name({"content-disposition": "form-data; name=data"}) == ("data", None)


def test_part_name_of_a_part_without_disposition_is_empty():
    assert part_name({}) == (None, None)
