"""multipart_spool: the streaming multipart reader of series uploads (spool_upload is tested
through the upload routes in test_series.py)."""
import io
import os

import pytest

import multipart_spool
from multipart_spool import MultipartError, MultipartTooLarge, parse

BOUNDARY = b"b0undary"


def body(parts, boundary=BOUNDARY, preamble=b"", end=True):
    out = preamble
    for headers, content in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return out + (b"--" + boundary + b"--\r\n" if end else b"")


def file_part(content, name=b"files", filename=b"a.dcm"):
    return (b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename
            + b'"\r\nContent-Type: application/octet-stream', content)


def field_part(content, name=b"note"):
    return (b'Content-Disposition: form-data; name="' + name + b'"', content)


class Sink(io.BytesIO):
    pass


def run(data, chunk=7, **kwargs):
    got = []

    def on_file(name):
        sink = Sink()
        got.append((name, sink))
        return sink
    count = parse(io.BytesIO(data), BOUNDARY, on_file, chunk=chunk, **kwargs)
    return count, [(name, sink.getvalue()) for name, sink in got]


@pytest.mark.parametrize("chunk", [1, 2, 7, 13, 64, 1 << 20])
def test_files_and_fields_across_any_chunk_size(chunk):
    tricky = b"\r\n--b0undar" + b"\r\n" * 3 + b"--" + os.urandom(300)
    data = body([file_part(b"one"), field_part(b"ignored"), file_part(tricky),
                 file_part(b"")], preamble=b"preamble text\r\n")
    count, files = run(data, chunk=chunk)
    assert count == 4
    assert files == [("files", b"one"), ("files", tricky), ("files", b"")]


def test_empty_body_and_other_field_names():
    assert run(b"--b0undary--\r\n") == (0, [])
    count, files = run(body([file_part(b"x", name=b"other")]))
    assert files == [("other", b"x")]


@pytest.mark.parametrize("data", [
    b"",
    b"no boundary here",
    body([file_part(b"x")], end=False),  # ends without the closing boundary
    body([file_part(b"x")])[:-20],  # truncated inside the part
    b"--b0undary\r\nContent-Disposition form-data\r\n\r\nx\r\n--b0undary--\r\n",
    b"--b0undary junk\r\n\r\nx\r\n--b0undary--\r\n",
    b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"",
])
def test_malformed_bodies(data):
    with pytest.raises(MultipartError):
        run(data)


def test_bounds():
    with pytest.raises(MultipartTooLarge):
        run(body([field_part(b"x" * 100)]), field_max=99)
    assert run(body([field_part(b"x" * 99)]), field_max=99)[0] == 1
    with pytest.raises(MultipartTooLarge):
        run(body([file_part(b"1"), file_part(b"2"), file_part(b"3")]), max_parts=2)
    with pytest.raises(MultipartError):
        run(b"--b0undary\r\nX: " + b"y" * (multipart_spool.HEADER_MAX_BYTES + 10)
            + b"\r\n\r\nx\r\n--b0undary--\r\n", chunk=1 << 20)


def test_related_parts_go_to_on_part_with_their_headers():
    got = []

    def on_part(headers):
        got.append((headers, Sink()))
        return got[-1][1]
    data = body([(b"Content-Type: application/dicom", b"one"),
                 (b"Content-Type: application/dicom\r\nContent-Location: x", b"two" * 50)])
    # a part may also go without any header: its type is the body's
    data = data[:-len(b"--b0undary--\r\n")] + b"--b0undary\r\n\r\nthree\r\n--b0undary--\r\n"
    assert parse(io.BytesIO(data), BOUNDARY, on_part=on_part, chunk=5) == 3
    assert [h for h, _ in got] == [{"content-type": "application/dicom"},
                                   {"content-type": "application/dicom",
                                    "content-location": "x"}, {}]
    assert [s.getvalue() for _, s in got] == [b"one", b"two" * 50, b"three"]


def test_form_data_part_without_headers_is_still_refused():
    with pytest.raises(MultipartError):
        run(b"--b0undary\r\n\r\nbare\r\n--b0undary--\r\n")
