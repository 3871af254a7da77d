"""PUT/GET /api/blob/<sha1>: voxel label storage."""
import gzip
import hashlib
import os

import pytest

import blobs

OCTET = "application/octet-stream"


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def put(client, headers, digest, data, encoding=None, mimetype=OCTET):
    extra = {"Content-Encoding": encoding} if encoding else {}
    return client.put(f"/api/blob/{digest}", data=data,
                      headers={**headers, "Content-Type": mimetype, **extra})


def blob_files(app):
    folder = os.path.join(app.config["CIRCUS_DATA_DIR"], "blobs")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_put_then_get_round_trip(client, auth_headers):
    data = bytes(range(256)) * 10
    res = put(client, auth_headers["guest"], sha1(data), data)
    assert res.status_code == 201
    assert res.data == b""
    res = client.get(f"/api/blob/{sha1(data)}", headers=auth_headers["guest"])
    assert res.status_code == 200
    assert res.mimetype == OCTET
    assert res.data == data


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip"])
def test_gzip_body_is_decompressed_before_hashing(app, client, auth_headers, encoding):
    data = b"\x01\x02\x03" * 5000
    res = put(client, auth_headers["bob"], sha1(data), gzip.compress(data), encoding)
    assert res.status_code == 201
    assert client.get(f"/api/blob/{sha1(data)}", headers=auth_headers["bob"]).data == data


def test_hash_of_compressed_bytes_is_a_mismatch(client, auth_headers):
    data = b"voxels" * 100
    packed = gzip.compress(data)
    res = put(client, auth_headers["bob"], sha1(packed), packed, "gzip")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Hash mismatch."}


def test_content_not_matching_its_hash_is_refused_and_not_stored(app, client, auth_headers):
    res = put(client, auth_headers["bob"], sha1(b"other"), b"content")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Hash mismatch."}
    assert blob_files(app) == []
    res = client.get(f"/api/blob/{sha1(b'other')}", headers=auth_headers["bob"])
    assert res.status_code == 404


def test_malformed_hash_is_a_mismatch(client, auth_headers):
    res = put(client, auth_headers["bob"], "../../etc", b"content")
    assert res.status_code in (400, 404)
    res = put(client, auth_headers["bob"], "ABCDEF" + "0" * 34, b"content")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Hash mismatch."}


def test_empty_content_is_refused(client, auth_headers):
    res = put(client, auth_headers["bob"], sha1(b""), b"")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Empty content was sent."}
    res = put(client, auth_headers["bob"], sha1(b""), gzip.compress(b""), "gzip")
    assert res.get_json() == {"error": "Empty content was sent."}


def test_limit_is_20_mib_after_decompression(app, client, auth_headers):
    exact = b"\0" * blobs.MAX_BLOB_BYTES
    res = put(client, auth_headers["bob"], sha1(exact), gzip.compress(exact), "gzip")
    assert res.status_code == 201
    over = exact + b"\0"
    # A 20 KB gzip bomb: refused while streaming, never held in memory or stored.
    res = put(client, auth_headers["bob"], sha1(over), gzip.compress(over), "gzip")
    assert res.status_code == 413
    assert res.get_json() == {"error": "request entity too large"}
    assert blob_files(app) == [sha1(exact)]


def test_raw_body_over_the_limit_is_refused(client, auth_headers):
    over = b"\1" * (blobs.MAX_BLOB_BYTES + 1)
    res = put(client, auth_headers["bob"], sha1(over), over)
    assert res.status_code == 413
    assert res.get_json() == {"error": "request entity too large"}


def test_corrupt_gzip_is_a_bad_request(client, auth_headers):
    res = put(client, auth_headers["bob"], sha1(b"x"), b"not gzip at all", "gzip")
    assert res.status_code == 400
    assert "error" in res.get_json()


def test_content_type_must_be_octet_stream(client, auth_headers):
    data = b"abc"
    res = put(client, auth_headers["bob"], sha1(data), data, mimetype="application/json")
    assert res.status_code == 415
    assert res.get_json() == {"error": "This content-type is unsupported. "
                                       "Expected application/octet-stream"}
    res = client.put(f"/api/blob/{sha1(data)}", data=data, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Content-type is unspecified."}


def test_unknown_blob_is_404(client, auth_headers):
    res = client.get(f"/api/blob/{'0' * 40}", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "Not Found"}
    res = client.get("/api/blob/not-a-hash", headers=auth_headers["bob"])
    assert res.status_code == 404


def test_blobs_need_a_token(client):
    data = b"abc"
    assert client.get(f"/api/blob/{sha1(data)}").status_code == 401
    res = client.put(f"/api/blob/{sha1(data)}", data=data, headers={"Content-Type": OCTET})
    assert res.status_code == 401


def test_put_overwrites_atomically(app, client, auth_headers):
    data = b"same content"
    assert put(client, auth_headers["bob"], sha1(data), data).status_code == 201
    assert put(client, auth_headers["bob"], sha1(data), data).status_code == 201
    assert blob_files(app) == [sha1(data)]  # no temporary file left behind
