"""The image server's ``scan``: multiplanar reformat, 8-bit windowing and PNG output.

A faithful numpy port of CIRCUS RS: the query rules of ``server/app/series/scan.ts``
(validated as ``common/Validator.ts`` does, numbers read the way JavaScript's
``parseFloat``/``parseInt`` read them), the sampling of ``RawData.scanObliqueSection``
and the window of ``common/pixel.ts`` ``applyWindow``. Coordinates are voxel indices
``(x, y, z)``; voxel ``i`` covers ``[i, i + 1)``. The output pixel ``(i, j)`` samples
``origin + i * xAxis / width + j * yAxis / height``, accumulated by repeated addition as
the reference does, so the floating-point positions are bit-identical to it.

Deliberate differences, each turning a reference 200 of garbage into a clear 400:
a non-finite coordinate, window width or level (``Infinity``, ``1e999``, or ``-`` which
the reference's ``isFloat`` lets through as NaN) is "<key> is invalid."; a size that
``parseInt`` cannot read (``.5,4``) is "Invalid image size"; a repeated key is invalid.
"""
import math
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAX_PIXELS = 2048 * 2048
SCAN_FORMATS = ("uint8", "int8", "uint16", "int16")
CHUNK_PIXELS = 1 << 18  # output pixels sampled at once: bounds the temporaries (~40 MB)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# JavaScript's StrWhiteSpaceChar, skipped before a number by parseFloat and parseInt
_JS_SPACE = "[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*"
_JS_FLOAT = re.compile(
    _JS_SPACE + r"([+-]?(?:Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?))")
_JS_INT = re.compile(_JS_SPACE + r"([+-]?[0-9]+)")
# validator.js 7.2 ``isFloat`` (the reference's version): note that "-" and "e5" pass
_IS_FLOAT = re.compile(r"[+-]?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")
_FALSE = re.compile(r"(0|false|f|no|)", re.IGNORECASE)
_INVALID = object()


class ScanError(Exception):
    """Raised when a scan cannot be made; the message is shown to users (a 400)."""


class ScanQueryError(ScanError):
    """Raised for a bad ``scan`` query; lines of several problems are joined by newlines."""


class UnsupportedVolumeError(ScanError):
    """Raised for a volume whose pixel format the reference cannot reformat (rgba8)."""


@dataclass(frozen=True)
class ScanRequest:
    """A validated ``scan`` query.

    Attributes
    ----------
    origin, x_axis, y_axis : tuple of float
        The section in voxel-index ``(x, y, z)``: the top-left corner of the image and
        the vectors spanning its full width and height.
    size : tuple of int
        Output ``(width, height)``, each > 0, at most ``MAX_PIXELS`` pixels.
    interpolation : bool
        Trilinear interpolation instead of nearest neighbour.
    ww, wl : float or None
        Window width and level; both given means an 8-bit windowed image.
    format : str
        ``"png"`` or ``"raw"`` (the reference's default, little-endian pixels).
    """

    origin: tuple
    x_axis: tuple
    y_axis: tuple
    size: tuple
    interpolation: bool = False
    ww: float | None = None
    wl: float | None = None
    format: str = "raw"

    @property
    def windowed(self):
        """True when the output is 8-bit windowed."""
        return self.ww is not None and self.wl is not None

    @property
    def media_type(self):
        """The Content-Type of the answer."""
        return "image/png" if self.format == "png" else "application/octet-stream"


def js_parse_float(text):
    """JavaScript's ``parseFloat``: the number leading ``text``, else NaN."""
    match = _JS_FLOAT.match(text)
    return float(match.group(1)) if match else math.nan


def js_parse_int(text):
    """JavaScript's ``parseInt(text, 10)`` as a float (NaN when no digits lead)."""
    match = _JS_INT.match(text)
    # float(), not int(): huge digit strings become inf as in JS, never a 4300-digit error
    return float(match.group(1)) if match else math.nan


def _tuple(count, parse):
    def parse_tuple(text):
        tokens = text.split(",")
        if len(tokens) != count or any(math.isnan(js_parse_float(t)) for t in tokens):
            return _INVALID
        return tuple(parse(t) for t in tokens)
    return parse_tuple


def _finite_tuple(text):
    values = _tuple(3, js_parse_float)(text)
    if values is _INVALID or not all(math.isfinite(v) for v in values):
        return _INVALID
    return values


def _window_value(text):
    if text in ("", ".") or not _IS_FLOAT.fullmatch(text):
        return _INVALID
    value = js_parse_float(text)
    return value if math.isfinite(value) else _INVALID


# key, required, default, parser (returns _INVALID when the value is bad); in the
# reference's order, which is the order of the error lines
_RULES = (
    ("origin", True, None, _finite_tuple),
    ("xAxis", True, None, _finite_tuple),
    ("yAxis", True, None, _finite_tuple),
    ("size", True, None, _tuple(2, js_parse_int)),
    ("interpolation", False, False, lambda text: not _FALSE.fullmatch(text)),
    ("ww", False, None, _window_value),
    ("wl", False, None, _window_value),
    ("format", False, "raw", lambda text: "png" if text == "png" else _INVALID),
)


def parse_scan_query(args):
    """Validate a ``scan`` query as CIRCUS RS does.

    Parameters
    ----------
    args : Mapping
        The query: a werkzeug ``MultiDict`` (repeated keys are seen) or a plain dict.

    Returns
    -------
    ScanRequest

    Raises
    ------
    ScanQueryError
        With the reference's message: ``"<key> is empty."`` / ``"<key> is invalid."``
        lines joined by ``\\n``, then "Window values are required for PNG output.",
        "Requested image size is too large." or "Invalid image size", in that order.
    """
    values, errors = {}, []
    for key, required, default, parse in _RULES:
        if key not in args:
            if required:
                errors.append(f"{key} is empty.")
            values[key] = default
            continue
        texts = args.getlist(key) if hasattr(args, "getlist") else [args[key]]
        value = parse(texts[0]) if len(texts) == 1 and isinstance(texts[0], str) else _INVALID
        if value is _INVALID:
            errors.append(f"{key} is invalid.")
        values[key] = value
    if errors:
        raise ScanQueryError("\n".join(errors))
    if values["format"] == "png" and (values["ww"] is None or values["wl"] is None):
        raise ScanQueryError("Window values are required for PNG output.")
    width, height = values["size"]
    # the reference tests the product first: -3000,-3000 is "too large"
    if width * height > MAX_PIXELS:
        raise ScanQueryError("Requested image size is too large.")
    if not (width > 0 and height > 0):  # NaN (unreadable by parseInt) fails too
        raise ScanQueryError("Invalid image size")
    return ScanRequest(values["origin"], values["xAxis"], values["yAxis"],
                       (int(width), int(height)), values["interpolation"], values["ww"],
                       values["wl"], values["format"])


def scan(volume, request):
    """Sample the section of ``request`` from ``volume`` (``scanObliqueSection``).

    Parameters
    ----------
    volume : numpy.ndarray
        Voxels shaped ``(z, y, x)``, of dtype uint8, int8, uint16 or int16 (any byte
        order). A partial volume must already be cut out by the caller.
    request : ScanRequest

    Returns
    -------
    numpy.ndarray
        Shaped ``(height, width)``: uint8 when windowed, else the volume's pixel format,
        little-endian, so ``tobytes()`` is the reference's raw answer. Samples outside
        the volume are 0 (also when windowed: the window is not applied to them).

    Raises
    ------
    UnsupportedVolumeError
        For rgba8 ``(z, y, x, 4)`` or any other layout: the reference reads an rgba8
        volume byte-wise as if it were gray, so there is no result worth reproducing.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype.name not in SCAN_FORMATS:
        kind = "rgba8" if volume.ndim == 4 else f"{volume.dtype.name} {volume.shape}"
        raise UnsupportedVolumeError(f"Scan is not supported for {kind} volumes.")
    width, height = request.size
    pixel_dtype = np.dtype(volume.dtype.name).newbyteorder("<")
    out = np.empty((height, width), dtype=np.uint8 if request.windowed else pixel_dtype)
    eu = np.array(request.x_axis, dtype=np.float64) / width
    ev = np.array(request.y_axis, dtype=np.float64) / height
    # row starts: origin, origin + ev, (origin + ev) + ev, ... (add.accumulate is sequential)
    row_starts = np.add.accumulate(np.vstack([request.origin, np.tile(ev, (height - 1, 1))]))
    sample = _sample_trilinear if request.interpolation else _sample_nearest
    rows = max(1, CHUNK_PIXELS // width)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for top in range(0, height, rows):
            starts = row_starts[top:top + rows]
            positions = []
            for axis in range(3):
                steps = np.full((len(starts), width), eu[axis])
                steps[:, 0] = starts[:, axis]
                positions.append(np.cumsum(steps, axis=1))  # pos += eu, as the reference
            values = sample(volume, *positions)
            if request.windowed:
                values = apply_window(values, request.ww, request.wl)
            # NaN marks a sample outside the volume: the reference stores undefined -> 0
            out[top:top + rows] = np.where(np.isnan(values), 0, js_round(values))
    return out


def js_round(values):
    """JavaScript's ``Math.round``: halves go up (-2.5 -> -2), unlike numpy's."""
    floor = np.floor(values)
    return floor + (values - floor >= 0.5)


def apply_window(values, ww, wl):
    """Map values to 0..255 as ``applyWindow`` does; NaN (outside) stays NaN.

    ``round((value - wl + ww / 2) * (255 / ww))`` clamped to 0..255, computed in this
    order so that ties round as in the reference. ``ww == 0`` gives a threshold at
    ``wl`` (255 / 0 is infinity), a negative ``ww`` an inverted window.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.float64(255) / np.float64(ww)
        return np.clip(js_round((values - wl + ww / 2) * scale), 0, 255)


def _sample_nearest(volume, x, y, z):
    """``getPixelNearestNeighbor``: the voxel containing each point, NaN outside."""
    nz, ny, nx = volume.shape
    # written as "inside" so that NaN positions are outside (the reference yields 0 too)
    inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    values = np.full(x.shape, np.nan)
    values[inside] = volume[z[inside].astype(np.intp), y[inside].astype(np.intp),
                            x[inside].astype(np.intp)]
    return values


def _sample_trilinear(volume, x, y, z):
    """``getPixelWithInterpolation``: trilinear between voxel centres, NaN outside.

    A point within half a voxel of a face (and exactly on the far face) is inside; there
    the missing neighbour is the edge voxel itself (step 0), as in the reference.
    """
    nz, ny, nx = volume.shape
    inside = (x >= 0) & (x <= nx) & (y >= 0) & (y <= ny) & (z >= 0) & (z <= nz)
    values = np.full(x.shape, np.nan)
    (ix, fx, dx), (iy, fy, dy), (iz, fz, dz) = (
        _cell(p[inside], n) for p, n in ((x, nx), (y, ny), (z, nz)))

    def at(ox, oy, oz):
        return volume[iz + oz, iy + oy, ix + ox].astype(np.float64)

    def plane(oz):
        upper = _mix(at(0, 0, oz), at(dx, 0, oz), fx)
        lower = _mix(at(0, dy, oz), at(dx, dy, oz), fx)
        return _mix(upper, lower, fy)

    values[inside] = _mix(plane(0), plane(dz), fz)
    return values


def _cell(position, count):
    """Lower voxel index, fraction and step (0 at an edge) along one axis."""
    shifted = position - 0.5
    index = np.floor(shifted)
    fraction = shifted - index  # taken before the clamp, as in the reference
    index = index.astype(np.intp)
    step = np.ones_like(index)
    below = index < 0
    index[below] = 0
    step[below | (index >= count - 1)] = 0
    return index, fraction, step


def _mix(v0, v1, a):
    return v0 * (1 - a) + v1 * a


def encode_png(image):
    """Encode an 8-bit grayscale image as PNG (no filter, zlib level 6).

    Parameters
    ----------
    image : numpy.ndarray
        uint8, shaped ``(height, width)``, both > 0.

    Returns
    -------
    bytes
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"A PNG needs a non-empty 2-D uint8 image, not {image.dtype} "
                         f"{image.shape}.")
    height, width = image.shape
    scanlines = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 per row
    scanlines[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
            + _png_chunk(b"IEND", b""))


def _png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))
