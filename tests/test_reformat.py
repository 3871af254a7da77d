"""dicom/reformat.py: the scan query, the sampling, the window and the PNG.

``reference_scan`` below is a line-by-line Python port of CIRCUS RS's
``RawData.scanOblique`` / ``getPixelNearestNeighbor`` / ``getPixelWithInterpolation`` and
``applyWindow`` (scalar doubles, as in JavaScript): the oracle for the vectorised module.
"""
import dataclasses
import math
import struct
import zlib
from urllib.parse import parse_qsl

import numpy as np
import pytest
from werkzeug.datastructures import MultiDict

from dicom import reformat
from dicom.reformat import (ScanQueryError, ScanRequest, UnsupportedVolumeError, apply_window,
                            encode_png, parse_scan_query, scan)

NZ, NY, NX = 4, 5, 6
VALID = "origin=0,0,0&xAxis=4,0,0&yAxis=0,4,0&size=4,4"


def query(text):
    return MultiDict(parse_qsl(text, keep_blank_values=True))


def linear_volume(dtype="i2"):
    """v[z, y, x] = 100 z + 10 y + x: a hand-checkable linear field."""
    return np.fromfunction(lambda z, y, x: 100 * z + 10 * y + x, (NZ, NY, NX)).astype(dtype)


def request(origin, x_axis, y_axis, size, **options):
    return ScanRequest(tuple(map(float, origin)), tuple(map(float, x_axis)),
                       tuple(map(float, y_axis)), size, **options)


# --- the reference, ported literally -------------------------------------------------

def js_round(value):
    floor = math.floor(value)
    return floor + 1 if value - floor >= 0.5 else floor


def reference_window(width, level, pixel):
    try:
        value = (pixel - level + width / 2) * (255 / width)
    except ZeroDivisionError:  # JavaScript: 255 / 0 is Infinity
        value = (pixel - level + width / 2) * math.copysign(math.inf, width)
    if math.isnan(value):
        return value
    value = js_round(value) if math.isfinite(value) else value
    return 255 if value > 255 else 0 if value < 0 else value


def reference_scan(volume, req):
    nz, ny, nx = volume.shape
    data = volume.tolist()

    def nearest(x, y, z):
        if x < 0 or y < 0 or z < 0 or x >= nx or y >= ny or z >= nz:
            return None
        return data[math.floor(z)][math.floor(y)][math.floor(x)]

    def interpolated(x, y, z):
        if x < 0 or y < 0 or z < 0 or x > nx or y > ny or z > nz:
            return None
        px, py, pz = x - 0.5, y - 0.5, z - 0.5
        ix, iy, iz = math.floor(px), math.floor(py), math.floor(pz)
        fx, fy, fz = px - ix, py - iy, pz - iz
        dx = dy = dz = 1
        if ix < 0:
            ix, dx = 0, 0
        elif nx - 1 <= ix:
            dx = 0
        if iy < 0:
            iy, dy = 0, 0
        elif ny - 1 <= iy:
            dy = 0
        if iz < 0:
            iz, dz = 0, 0
        elif nz - 1 <= iz:
            dz = 0

        def mix(v0, v1, a):
            return v0 * (1 - a) + v1 * a

        def at(x_, y_, z_):
            return data[z_][y_][x_]

        z1 = mix(mix(at(ix, iy, iz), at(ix + dx, iy, iz), fx),
                 mix(at(ix, iy + dy, iz), at(ix + dx, iy + dy, iz), fx), fy)
        z2 = mix(mix(at(ix, iy, iz + dz), at(ix + dx, iy, iz + dz), fx),
                 mix(at(ix, iy + dy, iz + dz), at(ix + dx, iy + dy, iz + dz), fx), fy)
        return mix(z1, z2, fz)

    width, height = req.size
    eu = [a / width for a in req.x_axis]
    ev = [a / height for a in req.y_axis]
    read = interpolated if req.interpolation else nearest
    x, y, z = req.origin
    out = []
    for _ in range(height):
        px, py, pz = x, y, z
        row = []
        for _ in range(width):
            value = read(px, py, pz)
            if value is not None and req.windowed:
                value = reference_window(req.ww, req.wl, value)
            row.append(0 if value is None or math.isnan(value) else js_round(value))
            px, py, pz = px + eu[0], py + eu[1], pz + eu[2]
        out.append(row)
        x, y, z = x + ev[0], y + ev[1], z + ev[2]
    return out


# --- orthogonal sections are the numpy slices ----------------------------------------

DTYPE_EXTREMES = {"u1": (0, 255), "i1": (-128, 127), "<u2": (0, 65535), "<i2": (-32768, 32767)}


@pytest.fixture(params=sorted(DTYPE_EXTREMES))
def volume(request):
    """A random volume of each pixel format, its extreme values included."""
    low, high = DTYPE_EXTREMES[request.param]
    rng = np.random.default_rng(7)
    vol = rng.integers(low, high, size=(NZ, NY, NX), endpoint=True).astype(request.param)
    vol[0, 0, 0], vol[-1, -1, -1] = low, high
    return vol


@pytest.mark.parametrize("interpolation", [False, True])
def test_orthogonal_sections_equal_slices(volume, interpolation):
    # voxel i spans [i, i + 1): sample at its centre (exact for both samplers)
    c = 0.5
    axial = request((c, c, 2 + c), (NX, 0, 0), (0, NY, 0), (NX, NY), interpolation=interpolation)
    coronal = request((c, 3 + c, c), (NX, 0, 0), (0, 0, NZ), (NX, NZ), interpolation=interpolation)
    sagittal = request((1 + c, c, c), (0, NY, 0), (0, 0, NZ), (NY, NZ),
                       interpolation=interpolation)
    for req, expected in ((axial, volume[2]), (coronal, volume[:, 3, :]),
                          (sagittal, volume[:, :, 1])):
        image = scan(volume, req)
        assert image.dtype == volume.dtype and image.dtype.byteorder in "<|="
        np.testing.assert_array_equal(image, expected)


def test_nearest_neighbour_uses_the_containing_voxel(volume):
    # any point in [i, i + 1) reads voxel i: integer origins give the slices too
    axial = scan(volume, request((0, 0, 1), (NX, 0, 0), (0, NY, 0), (NX, NY)))
    np.testing.assert_array_equal(axial, volume[1])
    almost_next = scan(volume, request((0.999, 0.999, 1.999), (NX, 0, 0), (0, NY, 0), (NX, NY)))
    np.testing.assert_array_equal(almost_next[:, :-1], volume[1, :, :-1])


def test_fewer_output_pixels_step_over_voxels():
    vol = linear_volume()
    image = scan(vol, request((0, 0, 3), (NX, 0, 0), (0, NY - 1, 0), (NX // 2, 2)))
    # eu = ev = 2 voxels
    np.testing.assert_array_equal(image, vol[3, 0:4:2, 0:6:2])


def test_raw_output_is_little_endian_for_any_input_byte_order():
    vol = linear_volume(">i2") - 300
    image = scan(vol, request((0, 0, 0), (NX, 0, 0), (0, NY, 0), (NX, NY)))
    assert image.dtype == np.dtype("<i2")
    assert image.tobytes() == vol[0].astype("<i2").tobytes()


# --- oblique sections, by hand and against the port ----------------------------------

def test_oblique_nearest_by_hand():
    # eu = (1.5, 1.5, 0), ev = (0, 0, 2.5): points x = y = 0.5, 2.0, 3.5 at z = 0.5, 3.0
    req = request((0.5, 0.5, 0.5), (4.5, 4.5, 0), (0, 0, 5), (3, 2))
    np.testing.assert_array_equal(scan(linear_volume(), req), [[0, 22, 33], [300, 322, 333]])


def test_oblique_trilinear_by_hand():
    # centre-relative p - 0.5 = 0, 1.5, 3 (x and y), 0 and 2.5 (z); a linear field is
    # reproduced exactly: 10 * 1.5 + 1.5 = 16.5 -> 17 (Math.round: halves go up)
    req = request((0.5, 0.5, 0.5), (4.5, 4.5, 0), (0, 0, 5), (3, 2), interpolation=True)
    np.testing.assert_array_equal(scan(linear_volume(), req), [[0, 17, 33], [250, 267, 283]])


def test_negative_halves_round_up_like_math_round():
    vol = np.full((2, 2, 2), -17, dtype="i2")
    vol[:, :, 1] = -18
    # x = 1.0 is halfway between the centres 0.5 and 1.5: -17.5 -> -17 (numpy says -18)
    image = scan(vol, request((1, 0.5, 0.5), (2, 0, 0), (0, 1, 0), (1, 1), interpolation=True))
    assert image.tolist() == [[-17]]


def test_trilinear_edge_half_voxels_repeat_the_edge_voxel():
    vol = linear_volume()
    # x in [0, 0.5] and [5.5, 6] lie beyond the outer centres: the edge value, no blend
    image = scan(vol, request((0, 0.5, 0.5), (7.5, 0, 0), (0, 1, 0), (5, 1), interpolation=True))
    # x = 0, 1.5, 3, 4.5, 6 -> 0 (edge), 1, 2.5 -> 3, 4, 5 (edge; the far face is inside)
    assert image.tolist() == [[0, 1, 3, 4, 5]]


def test_positions_accumulate_step_by_step_like_the_reference():
    vol = np.array([[[0, 100]]], dtype="u1")
    # eu = 1.1 / 11 = 0.1; ten additions give 0.9999999999999999 (still voxel 0) where
    # 10 * 0.1 would give 1.0 (voxel 1): the reference adds, so must we
    image = scan(vol, request((0, 0, 0), (1.1, 0, 0), (0, 1, 0), (11, 1)))
    assert image.tolist() == [[0] * 11]
    # the same holds down the rows (y += ev per row)
    column = scan(vol.reshape(1, 2, 1), request((0, 0, 0), (1, 0, 0), (0, 1.1, 0), (1, 11)))
    assert column.ravel().tolist() == [0] * 11


@pytest.mark.parametrize("dtype", sorted(DTYPE_EXTREMES))
def test_random_obliques_match_the_reference_port(dtype):
    low, high = DTYPE_EXTREMES[dtype]
    rng = np.random.default_rng(2024)
    vol = rng.integers(low, high, size=(7, 9, 11), endpoint=True).astype(dtype)
    windows = [(None, None), (None, 40.0), (1.0, 0.0), (0.0, 0.0), (-300.0, 100.0),
               (400.0, 40.0), (65536.0, 32767.5)]
    for case in range(60):
        ww, wl = windows[case % len(windows)]
        req = request(rng.uniform(-3, 13, 3), rng.uniform(-16, 16, 3), rng.uniform(-16, 16, 3),
                      (int(rng.integers(1, 14)), int(rng.integers(1, 14))),
                      interpolation=bool(case % 2), ww=ww, wl=wl)
        image = scan(vol, req)
        assert image.dtype == (np.uint8 if req.windowed else vol.dtype)
        assert image.tolist() == reference_scan(vol, req), req


def test_chunked_sampling_equals_one_pass(monkeypatch):
    vol = np.random.default_rng(3).integers(-1000, 3000, size=(8, 8, 8)).astype("i2")
    req = request((-0.3, 0.2, 0.7), (7.1, 2.3, -1.9), (1.7, 6.2, 8.4), (37, 29),
                  interpolation=True, ww=1500.0, wl=300.0)
    whole = scan(vol, req)
    monkeypatch.setattr(reformat, "CHUNK_PIXELS", 50)  # 1 row per chunk
    np.testing.assert_array_equal(scan(vol, req), whole)
    assert whole.tolist() == reference_scan(vol, req)


# --- window --------------------------------------------------------------------------

def test_window_edges_and_rounding():
    # ww 10, wl 0: (v + 5) * 25.5, rounded half up, clamped to 0..255
    values = np.array([-7, -6, -5, -4, -2, 0, 4, 5, 6, 100], dtype=float)
    assert apply_window(values, 10.0, 0.0).tolist() == [0, 0, 0, 26, 77, 128, 230, 255, 255, 255]


def test_window_multiplies_by_255_over_width_as_the_reference():
    # 12.5 * (255 / 25) = 127.49999999999999 -> 127, where 12.5 * 255 / 25 = 127.5 -> 128
    assert apply_window(np.array([0.0, 10.0]), 25.0, 0.0).tolist() == [127, 229]
    assert apply_window(np.array([0.0]), 50.0, 0.0).tolist() == [127]


def test_window_of_zero_width_is_a_threshold_and_negative_width_inverts():
    values = np.array([-1.0, 0.0, 1.0])
    assert apply_window(values, 0.0, 0.0).tolist()[::2] == [0, 255]
    assert math.isnan(apply_window(values, 0.0, 0.0)[1])  # 0 * inf: written as 0 by scan
    assert apply_window(values, -2.0, 0.0).tolist() == [255, 128, 0]


def test_windowed_scan_is_uint8():
    vol = linear_volume() - 200  # -200 .. 145
    image = scan(vol, request((0.5, 0.5, 0.5), (NX, 0, 0), (0, NY, 0), (NX, NY), ww=100.0,
                              wl=-170.0))
    assert image.dtype == np.uint8
    expected = np.clip(np.floor((vol[0] + 170 + 50) * 2.55 + 0.5), 0, 255)
    np.testing.assert_array_equal(image, expected)


# --- outside the volume --------------------------------------------------------------

def test_outside_is_zero_for_nearest_neighbour():
    vol = linear_volume() + 1  # no voxel is 0
    # x = -1, 0, ..., 6: -1 and 6 (the far face) are outside
    image = scan(vol, request((-1, 2, 3), (8, 0, 0), (0, 1, 0), (8, 1)))
    assert image.tolist() == [[0] + list(vol[3, 2, :]) + [0]]
    just_inside = request((5.999999, 2, 3), (1, 0, 0), (0, 1, 0), (1, 1))
    assert scan(vol, just_inside).item() == vol[3, 2, 5]
    assert scan(vol, request((-1e-12, 2, 3), (1, 0, 0), (0, 1, 0), (1, 1))).item() == 0
    assert scan(vol, request((0, 0, NZ), (1, 0, 0), (0, 1, 0), (1, 1))).item() == 0


def test_outside_is_zero_for_trilinear_but_the_far_face_is_inside():
    vol = linear_volume() + 1
    assert scan(vol, request((NX, 4.5, 3.5), (1, 0, 0), (0, 1, 0), (1, 1),
                             interpolation=True)).item() == vol[3, 4, 5]
    assert scan(vol, request((NX + 1e-9, 4.5, 3.5), (1, 0, 0), (0, 1, 0), (1, 1),
                             interpolation=True)).item() == 0
    assert scan(vol, request((0.5, 0.5, -1e-9), (1, 0, 0), (0, 1, 0), (1, 1),
                             interpolation=True)).item() == 0


def test_outside_stays_zero_when_windowed():
    vol = np.zeros((2, 2, 2), dtype="i2")
    # a 0 voxel maps to 128 under this window; outside is 0, the window is not applied
    image = scan(vol, request((-1, 0, 0), (4, 0, 0), (0, 1, 0), (4, 1), ww=10.0, wl=0.0))
    assert image.tolist() == [[0, 128, 128, 0]]


def test_a_whole_section_outside_is_black():
    vol = linear_volume()
    image = scan(vol, request((100, 100, 100), (50, 0, 0), (0, 50, 0), (16, 16),
                              interpolation=True))
    assert not image.any()


@pytest.mark.parametrize("shape, dtype", [((2, 3, 4, 4), "u1"), ((3, 4), "i2"),
                                          ((2, 3, 4), "f4"), ((2, 3, 4), "i4")])
def test_unsupported_volumes_are_refused(shape, dtype):
    with pytest.raises(UnsupportedVolumeError, match="Scan is not supported for"):
        scan(np.zeros(shape, dtype=dtype), request((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1)))


# --- the query -----------------------------------------------------------------------

def test_valid_query_defaults():
    req = parse_scan_query(query(VALID))
    assert req == ScanRequest((0.0, 0.0, 0.0), (4.0, 0.0, 0.0), (0.0, 4.0, 0.0), (4, 4))
    assert (req.interpolation, req.ww, req.wl, req.format) == (False, None, None, "raw")
    assert not req.windowed and req.media_type == "application/octet-stream"


def test_png_query():
    req = parse_scan_query(query(VALID + "&format=png&ww=.5&wl=-1e2&interpolation=1"))
    assert (req.ww, req.wl, req.format, req.interpolation) == (0.5, -100.0, "png", True)
    assert req.windowed and req.media_type == "image/png"


def test_numbers_are_read_like_javascript():
    # parseFloat takes the leading number; parseInt (size) the leading integer
    req = parse_scan_query(query(
        "origin=%201.5,2abc,-.5e1&xAxis=1.,%2B3,4e-1x&yAxis=0,0,1&size=1.9,2e3&ww=5.&wl=-0"))
    assert req.origin == (1.5, 2.0, -5.0)
    assert req.x_axis == (1.0, 3.0, 0.4)
    assert req.size == (1, 2)
    assert (req.ww, req.wl) == (5.0, 0.0)


def test_plain_dict_query():
    req = parse_scan_query({"origin": "1,2,3", "xAxis": "1,0,0", "yAxis": "0,1,0",
                            "size": "2048,2048"})
    assert req.size == (2048, 2048) and req.origin == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("text, expected", [
    ("0", False), ("false", False), ("FALSE", False), ("f", False), ("No", False), ("", False),
    ("1", True), ("true", True), ("yes", True), ("off", True), ("n", True), ("0 ", True)])
def test_interpolation_is_parsed_like_parse_boolean(text, expected):
    assert parse_scan_query(query(VALID + "&interpolation=" + text)).interpolation is expected


@pytest.mark.parametrize("text, message", [
    ("", "origin is empty.\nxAxis is empty.\nyAxis is empty.\nsize is empty."),
    ("xAxis=1,0,0&yAxis=0,1,0&size=x,1&ww=y&format=jpeg",
     "origin is empty.\nsize is invalid.\nww is invalid.\nformat is invalid."),
    ("origin=1,2&xAxis=1,0,0&yAxis=0,1,0&size=1,1", "origin is invalid."),
    (VALID.replace("origin=0,0,0", "origin="), "origin is invalid."),
    (VALID.replace("origin=0,0,0", "origin=a,b,c"), "origin is invalid."),
    (VALID.replace("origin=0,0,0", "origin=Infinity,0,0"), "origin is invalid."),
    (VALID.replace("xAxis=4,0,0", "xAxis=1,0,0,0"), "xAxis is invalid."),
    (VALID.replace("yAxis=0,4,0", "yAxis=0,,4"), "yAxis is invalid."),
    (VALID.replace("yAxis=0,4,0", "yAxis=0,1e999,4"), "yAxis is invalid."),
    (VALID.replace("size=4,4", "size=4"), "size is invalid."),
    (VALID.replace("size=4,4", "size=4,four"), "size is invalid."),
    (VALID + "&ww=abc&wl=1", "ww is invalid."),
    (VALID + "&ww=&wl=1", "ww is invalid."),
    (VALID + "&ww=-&wl=1", "ww is invalid."),
    (VALID + "&ww=1&wl=1e999", "wl is invalid."),
    (VALID + "&ww=1&wl=1.5.5", "wl is invalid."),
    (VALID + "&ww=1%20&wl=1", "ww is invalid."),
    (VALID + "&format=PNG", "format is invalid."),
    (VALID + "&format=", "format is invalid."),
    (VALID + "&origin=1,1,1", "origin is invalid."),  # repeated key
    (VALID + "&format=png", "Window values are required for PNG output."),
    (VALID + "&format=png&ww=100", "Window values are required for PNG output."),
    (VALID.replace("size=4,4", "size=0,0") + "&format=png",
     "Window values are required for PNG output."),
    (VALID.replace("size=4,4", "size=2049,2048"), "Requested image size is too large."),
    (VALID.replace("size=4,4", "size=1" + "0" * 400 + ",1"), "Requested image size is too large."),
    (VALID.replace("size=4,4", "size=-3000,-3000"), "Requested image size is too large."),
    (VALID.replace("size=4,4", "size=0,5"), "Invalid image size"),
    (VALID.replace("size=4,4", "size=5,-1"), "Invalid image size"),
    (VALID.replace("size=4,4", "size=.5,4"), "Invalid image size"),
    (VALID.replace("size=4,4", "size=Infinity,4"), "Invalid image size"),
])
def test_query_errors(text, message):
    with pytest.raises(ScanQueryError) as error:
        parse_scan_query(query(text))
    assert str(error.value) == message


# --- PNG -----------------------------------------------------------------------------

def decode_png(data):
    """A strict little decoder for 8-bit gray, unfiltered PNGs: chunks, CRCs, zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    assert (depth, color, compression, filtering, interlace) == (8, 0, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:]


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (64, 3)])
def test_png_decodes_back(shape):
    image = np.random.default_rng(5).integers(0, 255, size=shape, endpoint=True).astype("u1")
    np.testing.assert_array_equal(decode_png(encode_png(image)), image)


def test_png_of_a_scan():
    req = parse_scan_query(query("origin=0,0,1.5&xAxis=6,0,0&yAxis=0,5,0&size=12,10"
                                 "&interpolation=true&ww=600&wl=200&format=png"))
    image = scan(linear_volume(), req)
    assert decode_png(encode_png(image)).tolist() == reference_scan(linear_volume(), req)


@pytest.mark.parametrize("image", [np.zeros((2, 2), "i2"), np.zeros((2, 2, 3), "u1"),
                                   np.zeros((0, 4), "u1")])
def test_png_refuses_what_is_not_8_bit_gray(image):
    with pytest.raises(ValueError, match="non-empty 2-D uint8"):
        encode_png(image)


def test_request_is_a_value():
    req = parse_scan_query(query(VALID))
    assert dataclasses.replace(req, ww=1.0, wl=2.0).windowed
