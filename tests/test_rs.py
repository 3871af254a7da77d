"""The image server /rs: HTTP metadata and volume (Flask client), the volume WebSocket
(a real gunicorn and a WebSocket client), the volume cache."""
import gzip
import json
import os
import shutil
import socket
import sys
import threading
import time
import zlib
from datetime import timedelta

import numpy as np
import pydicom
import pytest
import simple_websocket
import websocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

import storage
from app import create_app
from auth import digest
from dicom import transfer, volume_cache
from models import Series, Token, db, utcnow
from tests.conftest import DICOM_DIR
from tests.factories import make_group, make_token, make_user
from tests.sample_series import store_series
from tests.test_e2e import Server, flask_cli, process_env
from tests.scratch_db import scratch_database_url

MISC = DICOM_DIR / "misc"
HEAD = sorted((DICOM_DIR / "head-first").glob("*.dcm"))
FOOT = sorted((DICOM_DIR / "foot-first").glob("*.dcm"))


def expected_pixels(path):
    """What CIRCUS RS delivers for a file, computed with pydicom: HU int16 for CT,
    RGBA for RGB, the stored type otherwise."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if ds.Modality == "CT":
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        return np.trunc(pixels.astype(np.float64) * slope + intercept).astype("<i2")
    if ds.PhotometricInterpretation == "RGB":
        return np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return pixels


def series_pixels(paths):
    return np.stack([expected_pixels(p) for p in paths])


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


def store(ctx, paths, uid=None, domain="default"):
    return store_series(paths, series_uid=uid, domain=domain)


def get(client, path, token=None, **headers):
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.get(path, headers=headers)


# --- HTTP: metadata ----------------------------------------------------------------------

def test_metadata_of_head_first_needs_no_token(ctx, client):
    uid = store(ctx, HEAD)
    res = client.get(f"/rs/series/{uid}/metadata")
    assert res.status_code == 200, res.json
    assert res.json == {"voxelCount": [320, 260, 10], "voxelSize": [1.1875, 1.1875, 8.1],
                        "dicomWindow": {"level": 567, "width": 1205},
                        "pixelFormat": "uint16", "mode": "3d"}
    assert list(res.json) == ["voxelCount", "voxelSize", "dicomWindow", "pixelFormat", "mode"]


@pytest.mark.parametrize("estimate", ["full", "first", "center"])
def test_estimated_window(ctx, client, estimate):
    uid = store(ctx, FOOT)
    pixels = series_pixels(FOOT)
    chosen = {"full": pixels, "first": pixels[:1], "center": pixels[5:6]}[estimate]
    low, high = int(chosen.min()), int(chosen.max())
    width = high - low + 1
    res = client.get(f"/rs/series/{uid}/metadata?estimateWindow={estimate}")
    assert res.json["estimatedWindow"] == {"level": low + width // 2, "width": width}
    assert list(res.json)[-2:] == ["estimatedWindow", "mode"]


def test_metadata_of_a_partial_volume(ctx, client):
    uid = store(ctx, HEAD)
    res = client.get(f"/rs/series/{uid}/metadata?start=9&end=3&delta=-3&estimateWindow=first")
    assert res.status_code == 200
    assert res.json["voxelCount"] == [320, 260, 3]
    low, high = int(expected_pixels(HEAD[2]).min()), int(expected_pixels(HEAD[2]).max())
    assert res.json["estimatedWindow"]["width"] == high - low + 1  # smallest image: #3


@pytest.mark.parametrize("name, body", [
    ("CT-MONO2-16-brain.dcm", {"voxelCount": [512, 512, 1], "pixelFormat": "int16",
                               "dicomWindow": {"level": 50, "width": 75}, "mode": "3d"}),
    ("CT-phantom-lossless.dcm", {"voxelCount": [512, 512, 1], "pixelFormat": "int16",
                                 "dicomWindow": {"level": 40, "width": 400}, "mode": "3d"}),
    ("MR-MONO2-16-head.dcm", {"voxelCount": [256, 256, 1], "pixelFormat": "int16",
                              "mode": "3d"}),
    ("MR-RGB-Head-MRA.dcm", {"voxelCount": [512, 512, 1], "pixelFormat": "rgba8",
                             "mode": "2d"}),
])
def test_metadata_of_single_images(ctx, client, name, body):
    uid = store(ctx, [MISC / name], uid="1.2.3.4." + str(len(name)))
    res = client.get(f"/rs/series/{uid}/metadata")
    assert res.status_code == 200
    assert {k: v for k, v in res.json.items() if k != "voxelSize"} == body
    # one image: pitch is Spacing Between Slices when given, else 1; 2d mode gives 1
    ds = pydicom.dcmread(MISC / name, stop_before_pixels=True)
    spacing = [float(v) for v in ds.get("PixelSpacing", [1, 1])]
    pitch = abs(float(ds.SpacingBetweenSlices)) if "SpacingBetweenSlices" in ds \
        and body["mode"] == "3d" else 1
    assert res.json["voxelSize"] == pytest.approx(spacing + [pitch])


def test_metadata_pitch_null_without_slice_location(ctx, client, tmp_path):
    paths = []
    for i, source in enumerate(HEAD[:2]):
        ds = pydicom.dcmread(source)
        del ds.SpacingBetweenSlices
        del ds.SliceLocation
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1])
    uid = store(ctx, paths)
    assert client.get(f"/rs/series/{uid}/metadata").json["voxelSize"] == [1.1875, 1.1875, None]


def test_metadata_token_is_checked_when_given(ctx, client, tokens):
    uid = store(ctx, HEAD)
    other = store(ctx, FOOT, domain="other")
    assert get(client, f"/rs/series/{uid}/metadata", tokens["alice"]).status_code == 200
    assert client.get(f"/rs/series/{uid}/metadata?token={tokens['alice']}").status_code == 200
    res = get(client, f"/rs/series/{uid}/metadata", "0" * 40)
    assert res.status_code == 401 and res.json == {"error": "Invalid token: access token is invalid"}
    res = get(client, f"/rs/series/{other}/metadata", tokens["alice"])
    assert res.status_code == 403 and "error" in res.json
    assert client.get(f"/rs/series/{other}/metadata?token={tokens['alice']}").status_code == 403


@pytest.mark.parametrize("query, status, error", [
    ("?start=1&end=4&delta=2", 400, "Volume descriptor is invalid"),
    ("?start=0&end=3&delta=1", 400, "Volume descriptor is invalid"),
    ("?start=5&end=12&delta=1", 400, "Volume descriptor is invalid"),
    ("?start=1", 400, "Volume descriptor is invalid"),
    ("?start=x&end=1.5&delta=1", 400, "start is invalid.\nend is invalid."),
    ("?estimateWindow=most", 400, "estimateWindow is invalid."),
])
def test_metadata_bad_queries(ctx, client, query, status, error):
    uid = store(ctx, HEAD)
    res = client.get(f"/rs/series/{uid}/metadata{query}")
    assert (res.status_code, res.json) == (status, {"error": error})


def test_invalid_and_unknown_series(ctx, client, tokens):
    for path in ("/rs/series/not-a-uid/metadata", "/rs/series/1..2/volume"):
        res = get(client, path, tokens["alice"])
        assert (res.status_code, res.json) == (400, {"error": "Invalid series UID"})
    res = get(client, "/rs/series/1.2.3.999/metadata")
    assert (res.status_code, res.json) == (404, {"error": "Series could not be loaded"})
    res = get(client, "/rs/series/1.2.3.999/volume", tokens["alice"])
    assert res.status_code == 404


def test_series_whose_files_are_gone_is_not_found(ctx, client):
    uid = store(ctx, HEAD)
    shutil.rmtree(storage.series_dir(uid))
    res = client.get(f"/rs/series/{uid}/metadata")
    assert (res.status_code, res.json) == (404, {"error": "Series could not be loaded"})


# --- HTTP: volume ------------------------------------------------------------------------

SAMPLES = [("head-first", HEAD), ("foot-first", FOOT),
           ("CT", [MISC / "CT-MONO2-16-brain.dcm"]),
           ("CT-lossless", [MISC / "CT-phantom-lossless.dcm"]),
           ("MR", [MISC / "MR-MONO2-16-head.dcm"]),
           ("MR-lossless", [MISC / "MR-phantom-lossless.dcm"]),
           ("RGB", [MISC / "MR-RGB-Head-MRA.dcm"])]


@pytest.mark.parametrize("name, paths", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_volume_matches_pydicom(ctx, client, tokens, name, paths):
    uid = store(ctx, paths, uid="1.2.826.0.1." + str(abs(hash(name)) % 10**8))
    res = get(client, f"/rs/series/{uid}/volume", tokens["alice"])
    assert res.status_code == 200 and res.content_type == "application/octet-stream"
    assert "Content-Encoding" not in res.headers
    expected = series_pixels(paths)
    assert res.data == expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    if name.startswith("CT"):
        assert expected.dtype == np.int16 and expected.min() < 0  # Hounsfield units


def test_volume_needs_a_token_and_the_domain(ctx, client, tokens):
    uid = store(ctx, HEAD, domain="other")
    res = client.get(f"/rs/series/{uid}/volume")
    assert res.status_code == 401 and "error" in res.json
    assert get(client, f"/rs/series/{uid}/volume", tokens["alice"]).status_code == 403
    assert client.get(f"/rs/series/{uid}/volume?token={tokens['alice']}").status_code == 403


@pytest.mark.parametrize("encoding, decode", [
    ("gzip", gzip.decompress), ("deflate", zlib.decompress),
    ("br;q=1, gzip;q=0.5", gzip.decompress)])
def test_volume_is_compressed_when_accepted(ctx, client, tokens, encoding, decode):
    uid = store(ctx, HEAD)
    res = get(client, f"/rs/series/{uid}/volume?start=2&end=10&delta=4", tokens["alice"],
              **{"Accept-Encoding": encoding})
    assert res.status_code == 200
    assert res.headers["Content-Encoding"] == encoding.split(",")[-1].split(";")[0].strip()
    expected = series_pixels([HEAD[1], HEAD[5], HEAD[9]])
    assert decode(res.data) == expected.tobytes()


# --- HTTP: scan (multiplanar reformat) -----------------------------------------------------

def test_scan_of_an_axial_plane_is_that_slice(ctx, client, tokens):
    uid = store(ctx, HEAD)
    expected = series_pixels(HEAD)  # (z, y, x)
    z, rows, columns = expected.shape
    res = get(client, f"/rs/series/{uid}/scan?origin=0,0,3&xAxis={columns},0,0"
                      f"&yAxis=0,{rows},0&size={columns},{rows}", tokens["alice"])
    assert res.status_code == 200 and res.content_type == "application/octet-stream"
    image = np.frombuffer(res.data, dtype=expected.dtype.newbyteorder("<"))
    assert np.array_equal(image.reshape(rows, columns), expected[3])


def test_scan_windowed_png_of_a_coronal_plane(ctx, client, tokens):
    uid = store(ctx, HEAD)
    expected = series_pixels(HEAD)
    z, rows, columns = expected.shape
    res = get(client, f"/rs/series/{uid}/scan?origin=0,5,0&xAxis={columns},0,0&yAxis=0,0,{z}"
                      f"&size={columns},{z}&ww=400&wl=40&format=png", tokens["alice"])
    assert res.status_code == 200 and res.content_type == "image/png"
    assert res.data.startswith(b"\x89PNG\r\n\x1a\n")
    raw = get(client, f"/rs/series/{uid}/scan?origin=0,5,0&xAxis={columns},0,0&yAxis=0,0,{z}"
                      f"&size={columns},{z}&ww=400&wl=40", tokens["alice"])
    assert len(raw.data) == columns * z  # 8-bit windowed without PNG


@pytest.mark.parametrize("query, error", [
    ("origin=0,0,0&xAxis=1,0,0&yAxis=0,1,0&size=4096,4096", "Requested image size is too large."),
    ("origin=0,0,0&xAxis=1,0,0&yAxis=0,1,0&size=0,4", "Invalid image size"),
    ("origin=0,0,0&xAxis=1,0,0&yAxis=0,1,0&size=4,4&format=png",
     "Window values are required for PNG output."),
    ("xAxis=1,0,0&yAxis=0,1,0&size=4,4", "origin is empty."),
])
def test_scan_bad_queries(ctx, client, tokens, query, error):
    uid = store(ctx, HEAD)
    res = get(client, f"/rs/series/{uid}/scan?{query}", tokens["alice"])
    assert (res.status_code, res.json) == (400, {"error": error})


def test_scan_needs_a_token_and_the_domain(ctx, client, tokens):
    uid = store(ctx, HEAD, domain="other")
    query = "origin=0,0,0&xAxis=4,0,0&yAxis=0,4,0&size=4,4"
    assert client.get(f"/rs/series/{uid}/scan?{query}").status_code == 401
    assert get(client, f"/rs/series/{uid}/scan?{query}", tokens["alice"]).status_code == 403


# --- the cache ---------------------------------------------------------------------------

def test_second_request_decodes_nothing(ctx, client, tokens):
    uid = store(ctx, HEAD)
    assert get(client, f"/rs/series/{uid}/volume", tokens["alice"]).data
    volume = volume_cache.for_app().entries[uid]
    assert volume.decodes == 10
    res = get(client, f"/rs/series/{uid}/volume", tokens["alice"])
    assert client.get(f"/rs/series/{uid}/metadata?estimateWindow=full").status_code == 200
    assert volume_cache.for_app().entries[uid] is volume and volume.decodes == 10
    assert res.data == series_pixels(HEAD).tobytes()


def test_reimport_is_not_served_stale(ctx, client, tokens):
    uid = store(ctx, HEAD)
    first = get(client, f"/rs/series/{uid}/volume", tokens["alice"]).data
    # the same UID now holds the foot-first pixels: rows are updated, files renamed in
    for number, path in enumerate(FOOT, 1):
        target = storage.instance_path(uid, number)
        shutil.copyfile(path, target + ".tmp")
        os.replace(target + ".tmp", target)
    series = db.session.get(Series, uid)
    series.images = "1-10"
    series.updated_at = utcnow() + timedelta(seconds=1)
    db.session.commit()
    second = get(client, f"/rs/series/{uid}/volume", tokens["alice"]).data
    assert first == series_pixels(HEAD).tobytes() and second == series_pixels(FOOT).tobytes()
    db.session.delete(db.session.get(Series, uid))
    db.session.commit()
    assert client.get(f"/rs/series/{uid}/metadata").status_code == 404


def test_cache_is_bounded(ctx, client, tokens, app):
    app.config["CIRCUS_RS_CACHE_BYTES"] = 320 * 260 * 2 * 15  # one 10-slice volume fits
    a, b = store(ctx, HEAD), store(ctx, FOOT)
    for uid in (a, b):
        assert len(get(client, f"/rs/series/{uid}/volume", tokens["alice"]).data) == 1664000
    cache = volume_cache.for_app()
    assert list(cache.entries) == [b] and cache.bytes == 320 * 260 * 2 * 10


def test_volume_rows_are_writable_and_sized():
    rows = volume_cache.allocate_rows(3, 5)
    rows[1] = np.arange(5)
    assert rows.shape == (3, 5) and rows.dtype == np.uint8 and list(rows[1]) == [0, 1, 2, 3, 4]
    assert volume_cache.allocate_rows(0, 5).shape == (0, 5)


def test_priority_queue_is_lifo_for_equal_priorities():
    queue = transfer.PriorityQueue(range(10))
    queue.append([5, 6], 1)
    queue.append([8], 1)
    queue.append([2], 3)
    queue.append([3, 4], 0)  # the latest request of a priority goes first
    assert [queue.shift() for _ in range(10)] == [2, 8, 5, 6, 3, 4, 0, 1, 7, 9]
    assert queue.shift() is None


@pytest.fixture
def socket_pair():
    """(simple-websocket server connection, the client's raw socket), handshake read."""
    server_end, client_end = socket.socketpair()
    environ = {"werkzeug.socket": server_end, "HTTP_HOST": "localhost",
               "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
               "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
               "HTTP_SEC_WEBSOCKET_VERSION": "13"}
    ws = simple_websocket.Server(environ)
    client_end.settimeout(10)
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        response += client_end.recv(1)
    yield ws, client_end
    client_end.close()
    ws.thread.join(5)


@pytest.mark.parametrize("size", [0, 100, 1000, 70000])
def test_slice_frames_are_what_a_client_reads(socket_pair, size):
    """Frames written around wsproto (one sendmsg, no copy) parse as the same messages,
    for each length encoding (7, 16, 64 bits)."""
    ws, client_end = socket_pair
    send = transfer.message_sender(ws)
    assert isinstance(ws.sock, transfer.SerialSocket)  # the direct path was taken
    rows = np.arange(2 * size, dtype=np.uint8).reshape(2, size)
    heads = [transfer.pack_head({"messageType": "TRANSFER_IMAGE", "imageIndex": i})
             for i in range(2)]
    for head, row in zip(heads, rows):
        send(head, row)
    reader = Connection(ConnectionType.CLIENT)
    messages = []
    while len(messages) < 2:
        reader.receive_data(client_end.recv(1 << 20))
        messages += [e for e in reader.events() if isinstance(e, BytesMessage)]
    assert all(m.message_finished for m in messages)
    assert [bytes(m.data) for m in messages] == [heads[0] + rows[0].tobytes(),
                                                 heads[1] + rows[1].tobytes()]


def test_a_gone_client_ends_the_socket_quietly(socket_pair):
    """Writing to a client that went away raises ConnectionClosed (flask-sock ends the
    socket without a traceback), not the socket's OSError."""
    ws, client_end = socket_pair
    send = transfer.message_sender(ws)
    client_end.close()
    with pytest.raises(simple_websocket.ConnectionClosed):
        for _ in range(100):
            send(b"{}\n", np.zeros(1 << 16, np.uint8))


def test_partial_writes_complete_the_frame():
    class Trickle:
        """A socket taking at most 7 bytes per write."""
        def __init__(self):
            self.out = bytearray()

        def sendmsg(self, buffers):
            data = b"".join(bytes(b) for b in buffers)[:7]
            self.out += data
            return len(data)

    trickle = Trickle()
    transfer.SerialSocket(trickle).sendmsg_all([b"head", b"", np.arange(40, dtype=np.uint8)])
    assert bytes(trickle.out) == b"head" + bytes(range(40))


# --- the WebSocket against gunicorn -----------------------------------------------------

@pytest.fixture(scope="module")
def rs_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rs")
    with scratch_database_url() as database_url:
        env = process_env(tmp / "data", database_url, WEB_CONCURRENCY="1")
        flask_cli(env, "init-db")
        srv = Server(tmp, env)
        srv.token = flask_cli(env, "add-permanent-token", "circus").strip().splitlines()[-1]
        app = create_app({"CIRCUS_DATA_DIR": env["CIRCUS_DATA_DIR"], "DATABASE_URL": database_url,
                          "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000"})
        with app.app_context():
            srv.uids = {"head": store_series(HEAD), "foot": store_series(FOOT),
                        "other": store_series(HEAD, series_uid="1.2.3.77", domain="other"),
                        "ct": store_series([MISC / "CT-phantom-lossless.dcm"])}
            outsider = make_group("outsiders", domains=["other"])
            make_user("out@example.com", "out", groups=[outsider.group_id])
            db.session.commit()
            srv.outsider = make_token("out@example.com")
            srv.expired = make_token("out@example.com")
            row = db.session.execute(db.select(Token).where(
                Token.access_token_hash == digest(srv.expired))).scalar_one()
            row.access_token_expires_at = utcnow() - timedelta(seconds=1)
            db.session.commit()
            srv.app = app
        srv.ws_base = srv.base.replace("http://", "ws://")
        srv.start("gunicorn", [sys.executable, "-m", "gunicorn", "-b", srv.base[7:],
                               "--no-control-socket", "app:create_app()"])
        try:
            srv.wait_until_up()
            yield srv
        finally:
            codes = srv.stop()
        assert codes["gunicorn"] == 0, srv.log("gunicorn")


def connect(server, token="cli"):
    token = server.token if token == "cli" else token
    ws = websocket.create_connection(f"{server.ws_base}/rs/ws/volume?token={token}",
                                     timeout=30)
    return ws


def test_socket_declines_compression(rs_server):
    """Slices go raw even when the client offers permessage-deflate, as browsers do."""
    ws = websocket.create_connection(
        f"{rs_server.ws_base}/rs/ws/volume?token={rs_server.token}", timeout=30,
        header=["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"])
    try:
        assert "sec-websocket-extensions" not in {k.lower() for k in ws.getheaders()}
        send(ws, messageType="BEGIN_TRANSFER", transferId="t", seriesUid=rs_server.uids["head"])
        header, payload = receive(ws)
        assert header["messageType"] == "TRANSFER_IMAGE" and len(payload) == 260 * 320 * 2
    finally:
        ws.close()


def send(ws, **data):
    ws.send_binary(transfer.pack(data))


def receive(ws, timeout=30):
    ws.settimeout(timeout)
    message = ws.recv()
    end = message.index(b"\n")
    return json.loads(message[:end]), message[end + 1:]


def nothing_arrives(ws, seconds=1.0):
    ws.settimeout(seconds)
    try:
        ws.recv()
    except websocket.WebSocketTimeoutException:
        return True
    return False


def collect(ws, count):
    got = {}
    for _ in range(count):
        data, payload = receive(ws)
        assert data["messageType"] == "TRANSFER_IMAGE"
        key = (data["transferId"], data["imageIndex"])
        assert key not in got, f"{key} sent twice"
        got[key] = payload
    return got


@pytest.mark.e2e
def test_ui_message_sequence_streams_every_slice_once(rs_server):
    ws = connect(rs_server)
    uid = rs_server.uids["head"]
    send(ws, messageType="BEGIN_TRANSFER", transferId="1", seriesUid=uid)
    send(ws, messageType="SET_PRIORITY", transferId="1", target=[7, 8, 9, 10, 11, -1],
         priority=2)
    send(ws, messageType="PAUSE_TRANSFER", transferId="1")
    send(ws, messageType="SET_PRIORITY", transferId="1", target=3, priority=5)
    send(ws, messageType="RESUME_TRANSFER", transferId="1")
    got = collect(ws, 10)
    assert nothing_arrives(ws)  # no "done" message, nothing twice
    expected = series_pixels(HEAD)
    assert {i for _, i in got} == set(range(10))
    for (_, index), payload in got.items():
        assert payload == expected[index].tobytes()
    send(ws, messageType="ABORT_TRANSFER", transferId="1")  # after the end: ignored
    ws.close()


@pytest.mark.e2e
def test_priority_order_and_pause_abort(rs_server):
    ws = connect(rs_server)
    uid = rs_server.uids["foot"]
    send(ws, messageType="PAUSE_TRANSFER", transferId="9")  # unknown: ignored
    send(ws, messageType="BEGIN_TRANSFER", transferId="a", seriesUid=uid,
         partialVolumeDescriptor={"start": 10, "end": 1, "delta": -1})
    data, payload = receive(ws)
    assert data == {"messageType": "TRANSFER_IMAGE", "transferId": "a", "imageIndex": 0}
    assert payload == expected_pixels(FOOT[9]).tobytes()  # image #10 first in PVD order
    send(ws, messageType="PAUSE_TRANSFER", transferId="a")
    time.sleep(0.3)
    ws.settimeout(0.2)
    drained = 0
    try:
        while True:
            ws.recv()
            drained += 1
    except websocket.WebSocketTimeoutException:
        pass
    assert nothing_arrives(ws, 0.5)  # paused
    send(ws, messageType="ABORT_TRANSFER", transferId="a")
    send(ws, messageType="RESUME_TRANSFER", transferId="a")
    assert nothing_arrives(ws, 0.5)  # aborted
    ws.close()


@pytest.mark.e2e
def test_interleaved_transfers_on_one_socket(rs_server):
    ws = connect(rs_server)
    send(ws, messageType="BEGIN_TRANSFER", transferId="h", seriesUid=rs_server.uids["head"])
    send(ws, messageType="BEGIN_TRANSFER", transferId="c", seriesUid=rs_server.uids["ct"])
    got = collect(ws, 11)
    assert {t for t, _ in got} == {"h", "c"}
    assert got[("c", 0)] == expected_pixels(MISC / "CT-phantom-lossless.dcm").tobytes()
    ws.close()


@pytest.mark.e2e
@pytest.mark.parametrize("message", [
    b"not json\n", b'{"messageType": "BEGIN_TRANSFER"}', b'{"messageType": "NOPE"}\n',
    b"[1, 2]\n", b'{"messageType": "SET_PRIORITY", "transferId": "zz", "target": 1}\n',
    b'{"messageType": "BEGIN_TRANSFER", "transferId": "b", "seriesUid": "1.2.3.999"}\n',
    b'{"messageType": "BEGIN_TRANSFER", "transferId": "b", "seriesUid": "x/../.."}\n',
    b"\xff\xfe\n", b'{"messageType": "BEGIN_TRANSFER", "transferId": "b", "seriesUid": '
                   b'"1.2.3.77", "partialVolumeDescriptor": {"start": 0}}\n'])
def test_bad_messages_are_ignored_and_the_socket_goes_on(rs_server, message):
    ws = connect(rs_server)
    ws.send_binary(message)
    assert nothing_arrives(ws, 0.5)
    send(ws, messageType="BEGIN_TRANSFER", transferId="ok", seriesUid=rs_server.uids["ct"])
    data, _ = receive(ws)
    assert data["transferId"] == "ok"
    ws.close()


@pytest.mark.e2e
@pytest.mark.parametrize("who", ["outsider", "expired", "none", "cli-other"])
def test_begin_transfer_refused(rs_server, who):
    token = {"outsider": rs_server.outsider, "expired": rs_server.expired, "none": "",
             "cli-other": "cli"}[who]
    uid = rs_server.uids["other" if who == "cli-other" else "head"]
    ws = connect(rs_server, token)
    send(ws, messageType="BEGIN_TRANSFER", transferId="1", seriesUid=uid)
    assert nothing_arrives(ws)
    ws.close()
    if who == "outsider":  # the same token may read its own domain's series
        ws = connect(rs_server, rs_server.outsider)
        send(ws, messageType="BEGIN_TRANSFER", transferId="1",
             seriesUid=rs_server.uids["other"])
        assert receive(ws)[0]["transferId"] == "1"
        ws.close()


@pytest.mark.e2e
def test_huge_message_closes_only_its_socket(rs_server):
    bystander = connect(rs_server)
    ws = connect(rs_server)
    ws.send_binary(b'{"messageType":"SET_PRIORITY"}\n' + b"0" * (1024 * 1024))
    ws.settimeout(10)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        while True:
            ws.recv()
            if not ws.connected:
                raise websocket.WebSocketConnectionClosedException()
    send(bystander, messageType="BEGIN_TRANSFER", transferId="1",
         seriesUid=rs_server.uids["ct"])
    assert receive(bystander)[0]["imageIndex"] == 0
    bystander.close()


@pytest.mark.e2e
def test_series_deleted_during_a_transfer(rs_server, tmp_path):
    uid = "1.2.3.88"
    with rs_server.app.app_context():
        store_series(HEAD, series_uid=uid)
    ws = connect(rs_server)
    send(ws, messageType="BEGIN_TRANSFER", transferId="1", seriesUid=uid)
    send(ws, messageType="PAUSE_TRANSFER", transferId="1")  # at most a slice or two first
    time.sleep(0.5)
    with rs_server.app.app_context():
        for number in range(1, 11):
            os.unlink(storage.instance_path(uid, number))
    send(ws, messageType="RESUME_TRANSFER", transferId="1")
    ws.settimeout(2)
    sent = 0
    try:
        while True:
            ws.recv()
            sent += 1
    except websocket.WebSocketTimeoutException:
        pass
    assert sent < 10  # only slices decoded before the deletion; then it stops
    send(ws, messageType="BEGIN_TRANSFER", transferId="2", seriesUid=rs_server.uids["ct"])
    assert receive(ws)[0]["transferId"] == "2"
    ws.close()


@pytest.mark.e2e
def test_idle_sockets_leave_short_requests_served(rs_server):
    sockets = [connect(rs_server) for _ in range(20)]
    send(sockets[0], messageType="BEGIN_TRANSFER", transferId="1",
         seriesUid=rs_server.uids["head"])
    collect(sockets[0], 10)
    started = time.monotonic()
    for _ in range(20):
        assert rs_server.get("/api/status", token=None).status_code == 200
    assert time.monotonic() - started < 5
    for ws in sockets:
        ws.close()


@pytest.mark.e2e
def test_open_socket_closes_on_shutdown(tmp_path):
    """SIGTERM: an open socket gets 1001 and gunicorn exits 0 well within graceful_timeout."""
    env = {**os.environ, "CIRCUS_DATA_DIR": str(tmp_path / "data"), "WEB_CONCURRENCY": "1"}
    env.pop("DATABASE_URL", None)
    flask_cli(env, "init-db")
    srv = Server(tmp_path, env)
    srv.token = flask_cli(env, "add-permanent-token", "circus").strip().splitlines()[-1]
    srv.start("gunicorn", [sys.executable, "-m", "gunicorn", "-b", srv.base[7:],
                           "--no-control-socket", "app:create_app()"])
    srv.wait_until_up()
    srv.ws_base = srv.base.replace("http://", "ws://")
    ws = connect(srv)
    started = time.monotonic()
    codes = srv.stop()
    assert codes == {"gunicorn": 0} and time.monotonic() - started < 8, srv.log("gunicorn")
    ws.settimeout(5)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        ws.recv()
        ws.recv()
