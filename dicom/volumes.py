"""Series (or a partial volume descriptor of one) -> voxels, MHD/RAW files and the tag dump.

Every image is decoded the way CIRCUS's image extractor does it (API.md 5.3): the pixel
format follows Photometric Interpretation, Bits Allocated and Pixel Representation;
MONOCHROME1 is inverted so that larger means brighter; RGB becomes ``rgba8`` (alpha 255);
CT is rescaled with Rescale Slope/Intercept to ``int16`` Hounsfield units. Compressed
transfer syntaxes are decoded by pydicom with the pylibjpeg plug-ins (JPEG lossless, JPEG
2000, RLE), so a JPEG-lossless file gives the same voxels as its uncompressed twin.
Uncompressed little-endian files (nearly all) skip pydicom: their header is walked over
the mapped file (``_RawHeader``) and the voxels are a view of the file's pixel data.

Volumes are read one slice at a time (``VolumeReader``, with a small read-ahead on a
thread) so that writers stream them and memory stays bounded; ``load_volume`` assembles a
whole numpy array for callers that need one.
"""
import logging
import math
import mmap
import os
import re
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from io import BytesIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

import storage
from dicom import tag_dump
from dicom.elements import (FIRST_PIXEL_TAG, IMPLICIT_LE, KNOWN_VRS, NATIVE_LITTLE_ENDIAN,
                            PIXEL_DATA, ElementError, Reader, js_string, split_meta)

log = logging.getLogger(__name__)

# pixel format -> (MetaImage element type, numpy dtype, bytes per voxel)
PIXEL_FORMATS = {
    "uint8": ("MET_UCHAR", np.dtype("u1"), 1),
    "int8": ("MET_CHAR", np.dtype("i1"), 1),
    "uint16": ("MET_USHORT", np.dtype("<u2"), 2),
    "int16": ("MET_SHORT", np.dtype("<i2"), 2),
    "rgba8": ("MET_UCHAR", np.dtype("u1"), 4),  # 4 channels, see mhd_header
}
RGB_PHOTOMETRICS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
READ_AHEAD = 3  # slices decoded ahead of the consumer
FETCH_AHEAD = 16  # stored files asked of the store ahead of the decoder (an object store
                  # fetches them in parallel; the data directory has nothing to do)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: map the pages at once
_FLOAT_RE = re.compile(r"^[+-]?(Infinity|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)")


class VolumeError(Exception):
    """Raised when a volume cannot be built; the message is shown to users."""


class ImageMissingError(VolumeError):
    """Raised when an image file of the series is not in the storage."""


class UnsupportedImageError(VolumeError):
    """Raised for pixel data CIRCUS volumes cannot hold (format, syntax, multi-frame)."""


def js_parse_float(text):
    """JavaScript's ``parseFloat``: the leading number of ``text``, else NaN."""
    if text is None:
        return math.nan
    match = _FLOAT_RE.match(text.strip())
    if not match:
        return math.nan
    value = match.group(0)
    return float(value.replace("Infinity", "inf"))


def pvd_images(pvd):
    """The image numbers selected by a partial volume descriptor, in its order."""
    try:
        start, end = pvd["start"], pvd["end"]
        delta = 1 if pvd.get("delta") is None else pvd["delta"]
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, delta))
    except (TypeError, KeyError, AttributeError):
        valid = False
    if not valid or start < 1 or end < 1 or delta == 0 or (end - start) * delta < 0 \
            or (end - start) % delta or (start == end and delta == -1):
        raise VolumeError(f"Invalid partial volume descriptor: {pvd}")
    return list(range(start, end + (1 if delta > 0 else -1), delta))


# --- one slice ------------------------------------------------------------------------------

@dataclass
class Slice:
    """One decoded image, in the volume's pixel format."""
    number: int
    pixels: np.ndarray  # (rows, columns) or (rows, columns, 4) for rgba8
    pixel_format: str
    columns: int
    rows: int
    modality: str
    pixel_spacing: tuple
    spacing_between_slices: float | None  # (0018,0088) as written, may be negative
    slice_location: float  # NaN when absent
    data: bytes | None = None  # the file (bytes or a read-only map), for the tag dump


def _text(ds, tag):
    """An element's value as dicom-parser's ``string()`` gives it (None when absent)."""
    try:
        elem = ds.get_item(tag)
    except Exception:  # a value pydicom cannot even hold raw
        return None
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        return js_string(value)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _pixel_format(ds, where):
    photometric = (_text(ds, 0x00280004) or "").upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        bits = ds.get("BitsAllocated")
        signed = ds.get("PixelRepresentation", 0)
        formats = {(8, 0): "uint8", (8, 1): "int8", (16, 0): "uint16", (16, 1): "int16"}
        if (bits, signed) in formats:
            return formats[(bits, signed)]
    elif photometric in RGB_PHOTOMETRICS and ds.get("SamplesPerPixel") == 3 \
            and ds.get("BitsAllocated") == 8:
        return "rgba8"
    raise UnsupportedImageError(f"Unsupported pixel format detected ({where}: "
                                f"{photometric or 'no photometric interpretation'}, "
                                f"{ds.get('BitsAllocated')} bits allocated).")


def decode_slice(number, data, where=None):
    """Decode one DICOM file (bytes) into a ``Slice``; VolumeError when impossible."""
    where = where or f"image #{number}"
    ds, pixel_span = _read_header(data, where)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnsupportedImageError(f"Multi-frame images are not supported ({where}).")
    if pixel_span is None and "PixelData" not in ds:
        raise UnsupportedImageError(f"The file of {where} has no pixel data.")
    pixel_format = _pixel_format(ds, where)
    rows, columns = ds.get("Rows"), ds.get("Columns")
    try:
        array = None
        if pixel_span is not None:
            start, length = pixel_span
            array = _native_pixels(ds, memoryview(data)[start:start + length], pixel_format,
                                   rows, columns)
            if array is None:  # pydicom's general path needs the pixel data element
                ds = _read_full(data, where)
        elif "PixelData" in ds:
            array = _native_pixels(ds, ds.get_item(PIXEL_DATA).value, pixel_format, rows,
                                   columns)
        if array is None:
            array = ds.pixel_array
    except VolumeError:
        raise
    except Exception as exc:  # pydicom raises many kinds for undecodable data
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        log.info("Cannot decode %s (%s): %s", where, syntax, exc)
        raise UnsupportedImageError(
            f"Unsupported transfer syntax. Maybe compressed? ({where}, {syntax})") from None
    expected = (rows, columns, 3) if pixel_format == "rgba8" else (rows, columns)
    if array.shape != expected:
        raise UnsupportedImageError(f"Unexpected pixel data length ({where}).")
    pixels = _convert(ds, array, pixel_format)
    modality = _text(ds, 0x00080060) or ""
    if modality == "CT":
        pixels, pixel_format = _to_hounsfield(pixels, *_rescale(ds)), "int16"
    return Slice(number=number, pixels=pixels, pixel_format=pixel_format, columns=columns,
                 rows=rows, modality=modality, pixel_spacing=_pixel_spacing(ds),
                 spacing_between_slices=_spacing_between_slices(ds, where),
                 slice_location=js_parse_float(_text(ds, 0x00201041)))


_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError)


def _read_full(data, where):
    try:
        return pydicom.dcmread(BytesIO(data), force=True)
    except _READ_ERRORS as exc:
        raise VolumeError(f"The file of {where} is not readable DICOM ({exc}).") from None


def _read_header(data, where):
    """The dataset of a file, and ``(offset, length)`` of its pixel data value in ``data``
    when that is native little-endian pixel data (else None, and the dataset is read
    whole). The voxels are taken from ``data``: pydicom reading the pixel element costs
    about twice as much as the rest of the header, and pydicom parsing the header costs
    ten times more than ``_RawHeader``, which serves the usual files."""
    header = _RawHeader.parse(data)
    if header is not None:
        return header, header.pixel_span
    fp = BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
    except _READ_ERRORS:
        return _read_full(data, where), None  # the full read gives the same error message
    span = _pixel_span(ds, data, fp.tell())
    return (ds, span) if span is not None else (_read_full(data, where), None)


def _pixel_span(ds, data, pos):
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if syntax not in NATIVE_LITTLE_ENDIAN or len(data) < pos + 12:
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if not little or implicit is None:
        return None
    if data[pos:pos + 4] != b"\xe0\x7f\x10\x00":  # (7FE0,0010) Pixel Data
        return None
    if implicit:
        start, (length,) = pos + 8, struct.unpack_from("<I", data, pos + 4)
    elif data[pos + 4:pos + 8] in (b"OB\0\0", b"OW\0\0"):
        start, (length,) = pos + 12, struct.unpack_from("<I", data, pos + 8)
    else:
        return None
    if length == 0xFFFFFFFF or start + length > len(data):
        return None  # encapsulated or truncated: pydicom decides
    return start, length


_US_KEYWORDS = {"SamplesPerPixel": 0x00280002, "Rows": 0x00280010, "Columns": 0x00280011,
                "BitsAllocated": 0x00280100, "BitsStored": 0x00280101, "HighBit": 0x00280102,
                "PixelRepresentation": 0x00280103}


class _RawValue:
    """What pydicom's ``get_item`` gives for an element not yet converted: raw bytes."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _RawMeta:
    __slots__ = ("TransferSyntaxUID",)

    def __init__(self, syntax):
        self.TransferSyntaxUID = syntax


class _RawHeader:
    """The top-level elements of a native little-endian Part 10 file, walked over the bytes
    (``elements.Reader``), answering the few ``Dataset`` calls decoding makes exactly as
    pydicom would: ``get_item`` gives the raw bytes (as pydicom does for an element not yet
    read, which is what ``_text`` relies on) and ``get`` converts the US keywords and
    Number of Frames. ``parse`` gives None for anything unusual (another syntax, an odd VR
    or length, a truncated file...), which then goes through pydicom."""

    def __init__(self, syntax, elements, pixel_span):
        self.file_meta = _RawMeta(syntax)
        self.elements = elements  # tag -> (vr or None, value bytes)
        self.pixel_span = pixel_span

    @classmethod
    def parse(cls, data):
        try:
            meta_end, syntax = split_meta(data)
            if syntax not in NATIVE_LITTLE_ENDIAN:
                return None
            explicit = syntax != IMPLICIT_LE
            reader = Reader(data, little_endian=True, explicit=explicit)
            elements = {}
            for tag, vr, offset, length in reader.elements(meta_end, None, explicit):
                if explicit and vr not in KNOWN_VRS:
                    return None  # not explicit VR after all: pydicom guesses better
                if tag >= FIRST_PIXEL_TAG:
                    if tag != PIXEL_DATA or vr not in (None, "OB", "OW") \
                            or offset + length > len(data):
                        return None
                    header = cls(syntax, elements, (offset, length))
                    return header if header._usual() else None
                elements[tag] = (vr, data[offset:offset + length])
        except ElementError:
            return None
        return None  # no pixel data: pydicom says so

    def get_item(self, tag):
        element = self.elements.get(tag)
        return None if element is None else _RawValue(element[1])

    def __contains__(self, keyword):
        return keyword == "PixelData"

    def get(self, keyword, default=None):
        if keyword == "NumberOfFrames":
            element = self.elements.get(0x00280008)
            if element is None:
                return default
            text = _is_text(element[1])
            return int(text) if text else None
        element = self.elements.get(_US_KEYWORDS[keyword])
        return default if element is None else struct.unpack("<H", element[1])[0]

    def _usual(self):
        """Whether ``get`` answers as pydicom would (single US values, a plain IS)."""
        for tag in _US_KEYWORDS.values():
            element = self.elements.get(tag)
            if element is not None and (element[0] not in (None, "US") or len(element[1]) != 2):
                return False
        frames = self.elements.get(0x00280008)
        return frames is None or frames[0] in (None, "IS") and \
            (not _is_text(frames[1]) or _is_text(frames[1]).isdigit())


def _is_text(raw):
    return raw.decode("latin_1").strip(" \0")


def _native_pixels(ds, raw, pixel_format, rows, columns):
    """Uncompressed little-endian monochrome pixels read straight from the element's bytes
    (pydicom's general path costs more than the rest of the decoding); None when not
    applicable."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if syntax not in NATIVE_LITTLE_ENDIAN or pixel_format == "rgba8" or not rows or not columns:
        return None
    dtype = PIXEL_FORMATS[pixel_format][1]
    if not isinstance(raw, (bytes, bytearray, memoryview)) \
            or len(raw) < rows * columns * dtype.itemsize:
        return None
    array = np.frombuffer(raw, dtype=dtype, count=rows * columns).reshape(rows, columns)
    bits = dtype.itemsize * 8
    stored = int(ds.get("BitsStored") or bits)
    high = int(ds.get("HighBit") if ds.get("HighBit") is not None else stored - 1)
    if pixel_format.startswith("int") and 0 < stored < bits:
        # two's complement with the sign at High Bit, as CIRCUS's convertComplement
        value = (array.astype(np.int32) & ((1 << bits) - 1)) >> (high - stored + 1)
        value &= (1 << stored) - 1
        value = np.where(value & (1 << (stored - 1)), value - (1 << stored), value)
        return value.astype(dtype)
    return array


def _to_hounsfield(pixels, slope, intercept):
    """Stored values * slope + intercept, truncated toward zero and clipped to int16."""
    if slope == 1 and intercept == int(intercept) and abs(intercept) < 1 << 15 \
            and pixels.dtype.itemsize <= 2:
        # a bound the stored type already keeps in range needs no pass over the pixels
        # (int16 with a negative intercept, the usual CT, only needs the minimum)
        info = np.iinfo(pixels.dtype)
        low = int(pixels.min()) if info.min + intercept < -32768 else info.min
        high = int(pixels.max()) if info.max > 32767 or info.max + intercept > 32767 \
            else info.max
        if -32768 <= low and high <= 32767 and -32768 <= low + intercept \
                and high + intercept <= 32767:
            # the usual case: exact in 16 bits, one pass and no 32-bit temporaries
            hu = np.empty(pixels.shape, dtype="<i2")
            np.add(pixels, np.int16(intercept), out=hu, casting="unsafe")
            return hu
    if slope == 1 and intercept == int(intercept) and abs(intercept) < 1 << 20:
        hu = pixels.astype(np.int32)  # integers are several times faster than floats
        hu += int(intercept)
    else:
        hu = np.trunc(pixels.astype(np.float64) * slope + intercept)
    if hu.min() < -32768 or hu.max() > 32767:
        np.clip(hu, -32768, 32767, out=hu)
    return hu.astype("<i2")


def _convert(ds, array, pixel_format):
    """Stored values -> the pixel format's values (MONOCHROME1 inverted, RGB -> RGBA)."""
    if pixel_format == "rgba8":
        rgba = np.empty(array.shape[:2] + (4,), dtype=np.uint8)
        rgba[..., :3] = array
        rgba[..., 3] = 255
        return rgba
    dtype = PIXEL_FORMATS[pixel_format][1]
    if (_text(ds, 0x00280004) or "").upper() == "MONOCHROME1":
        stored = int(ds.get("BitsStored") or dtype.itemsize * 8)
        wide = array.astype(np.int64)
        wide = -wide - 1 if pixel_format.startswith("int") else (1 << stored) - 1 - wide
        return wide.astype(dtype)
    return np.ascontiguousarray(array, dtype=dtype)


def _rescale(ds):
    intercept, slope = _text(ds, 0x00281052), _text(ds, 0x00281053)
    if intercept is None or slope is None:
        return 1.0, 0.0
    return js_parse_float(slope), js_parse_float(intercept)


def _pixel_spacing(ds):
    raw = _text(ds, 0x00280030)
    if not raw:
        return (1.0, 1.0)
    values = [js_parse_float(v) for v in raw.split("\\")]
    return (values[0], values[1] if len(values) > 1 else values[0])


def _spacing_between_slices(ds, where):
    if ds.get_item(0x00180088) is None:
        return None
    value = js_parse_float(_text(ds, 0x00180088))
    if math.isnan(value) or value == 0:
        raise VolumeError(f"Slice pitch could not be determined ({where}).")
    return value


# --- a volume, slice by slice ---------------------------------------------------------------

def _read(locate, number, series_uid):
    """The bytes of the image file ``locate()`` returns (``store.fetch``: the file itself on
    the data directory, a cached copy of an object): a read-only map of it (pages already
    populated), else bytes.

    Mapping costs a quarter of the CPU of ``read`` here (no copy into fresh memory, and
    no page fault per 4 KiB); the voxels are viewed from it. Stored instance files are
    never changed in place (they are written to a temporary name and renamed), so the
    map cannot shrink under us; a deleted file stays readable through its map.
    """
    try:
        with open(locate(), "rb") as fh:
            try:
                return mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE,
                                 prot=mmap.PROT_READ)
            except (ValueError, OSError):  # an empty file, or a file system without mmap
                return fh.read()
    except FileNotFoundError:
        raise ImageMissingError(
            f"Image #{number} of series {series_uid} is missing from the storage.") from None
    except OSError as exc:
        raise VolumeError(f"Image #{number} of series {series_uid} cannot be read "
                          f"({exc.strerror or exc}).") from None


def _load(locate, number, series_uid, keep_bytes):
    data = _read(locate, number, series_uid)
    slice_ = decode_slice(number, data, f"image #{number} of series {series_uid}")
    if keep_bytes:
        slice_.data = data
    return slice_


class VolumeReader:
    """The images of a series in the given order, decoded one at a time with read-ahead.

    The first two slices are read on construction (they fix the geometry, the pixel
    format and the slice pitch); iterating yields every slice, checking that each one
    matches the first. Use as a context manager so the read-ahead thread is stopped.
    """

    def __init__(self, series_uid, numbers, keep_bytes=False):
        if not numbers:
            raise VolumeError(f"Series {series_uid} has no image to load.")
        self.series_uid = series_uid
        self.numbers = list(numbers)
        self.keep_bytes = keep_bytes
        self._store = storage.store()  # resolved here: read-ahead threads have no app context
        self._keys = [storage.instance_key(series_uid, n) for n in self.numbers]
        self._prefetched = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volume-read")
        self._futures = deque()
        self._next = 0
        self._consumed = 0
        self._head = []
        try:
            self._head = [self._take() for _ in range(min(2, len(self.numbers)))]
        except BaseException:
            self.close()
            raise
        self.first = self._head[0]
        self.second = self._head[1] if len(self._head) > 1 else None

    # read-ahead
    def _fill(self):
        if self._prefetched < min(len(self._keys), self._next + FETCH_AHEAD // 2):
            end = min(len(self._keys), self._next + FETCH_AHEAD)
            self._store.prefetch(self._keys[self._prefetched:end])
            self._prefetched = end
        while self._next < len(self.numbers) and len(self._futures) < READ_AHEAD:
            i = self._next
            self._futures.append(self._pool.submit(
                _load, partial(self._store.fetch, self._keys[i]), self.numbers[i],
                self.series_uid, self.keep_bytes))
            self._next += 1

    def _take(self):
        self._fill()
        slice_ = self._futures.popleft().result()
        self._fill()
        return slice_

    def __iter__(self):
        for slice_ in self._head:
            self._check(slice_)
            yield slice_
        self._head = []
        while self._futures or self._next < len(self.numbers):
            slice_ = self._take()
            self._check(slice_)
            yield slice_

    def _check(self, slice_):
        first = self.first
        if (slice_.columns, slice_.rows) != (first.columns, first.rows):
            raise VolumeError(f"Image #{slice_.number} of series {self.series_uid} differs "
                              "in size from the first image.")
        if slice_.pixel_format != first.pixel_format:
            raise VolumeError(f"Image #{slice_.number} of series {self.series_uid} differs "
                              "in pixel format from the first image.")

    def close(self):
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # geometry
    @property
    def pixel_format(self):
        return self.first.pixel_format

    @property
    def dimension(self):
        """[columns, rows, slices], as MHD DimSize."""
        return [self.first.columns, self.first.rows, len(self.numbers)]

    @property
    def slice_bytes(self):
        return self.first.columns * self.first.rows * PIXEL_FORMATS[self.pixel_format][2]

    @property
    def total_bytes(self):
        return self.slice_bytes * len(self.numbers)

    def plugin_pitch(self):
        """Slice pitch of the plug-in input (5.3): Spacing Between Slices as written, else
        |Slice Location difference|, else 1 (also when Slice Location is missing, quirk 36)."""
        if self.first.spacing_between_slices is not None:
            return self.first.spacing_between_slices
        if self.second is None:
            return 1
        pitch = abs(self.first.slice_location - self.second.slice_location)
        return 1 if math.isnan(pitch) else pitch

    def export_pitch(self, delta=1):
        """Slice pitch of the MHD case export (3.3): like ``plugin_pitch`` but never
        negative; Spacing Between Slices is multiplied by |delta| for a PVD with gaps."""
        if self.first.spacing_between_slices is not None:
            return abs(self.first.spacing_between_slices) * abs(delta)
        return abs(self.plugin_pitch())

    def spacing(self, pitch):
        return [self.first.pixel_spacing[0], self.first.pixel_spacing[1], pitch]


# --- files ----------------------------------------------------------------------------------

def mhd_header(pixel_format, dimension, spacing, data_file, line_ending="lf"):
    """The MetaImage header text CIRCUS writes (every line ends with the line ending).

    For ``rgba8`` the reference writes ``ElementType = undefined`` (quirk 36); we write a
    valid 4-channel MET_UCHAR header instead.
    """
    newline = "\r\n" if line_ending == "crlf" else "\n"
    element_type = PIXEL_FORMATS[pixel_format][0]
    lines = ["ObjectType = Image", "NDims = 3",
             "DimSize = " + " ".join(str(int(d)) for d in dimension)]
    if pixel_format == "rgba8":
        lines.append("ElementNumberOfChannels = 4")
    lines += [f"ElementType = {element_type}",
              "ElementSpacing = " + " ".join(tag_dump.js_number(float(s)) for s in spacing),
              "ElementByteOrderMSB = False", f"ElementDataFile = {data_file}"]
    return newline.join(lines) + newline


def load_volume(series_uid, image_numbers):
    """Decode images of a series into one array.

    Parameters
    ----------
    series_uid : str
    image_numbers : list of int
        Instance numbers in volume order (e.g. ``pvd_images(pvd)``).

    Returns
    -------
    (numpy.ndarray, dict)
        The voxels as (z, y, x) — (z, y, x, 4) for rgba8 — and the metadata:
        ``pixelFormat``, ``elementType``, ``dimension`` [x, y, z], ``pixelSpacing``
        [x, y], ``slicePitch`` (5.3 rule), ``modality``.
    """
    with VolumeReader(series_uid, image_numbers) as reader:
        first = reader.first
        shape = (len(reader.numbers), first.rows, first.columns) + \
            ((4,) if reader.pixel_format == "rgba8" else ())
        volume = np.empty(shape, dtype=PIXEL_FORMATS[reader.pixel_format][1])
        for z, slice_ in enumerate(reader):
            volume[z] = slice_.pixels
        meta = {"pixelFormat": reader.pixel_format,
                "elementType": PIXEL_FORMATS[reader.pixel_format][0],
                "dimension": reader.dimension, "pixelSpacing": list(first.pixel_spacing),
                "slicePitch": reader.plugin_pitch(), "modality": first.modality}
    return volume, meta


def write_plugin_input(series_uid, pvd, out_dir, index, private_tags=()):
    """Write ``<index>.raw``, ``<index>.mhd`` and ``<index>.json`` (API.md 5.3) into out_dir.

    The raw file is streamed slice by slice; all three files are read-only. Raises
    VolumeError (with a user-facing message) when the volume cannot be built; no file
    of this index is left behind then.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = {ext: os.path.join(out_dir, f"{index}.{ext}") for ext in ("raw", "mhd", "json")}
    dumps = []
    try:
        with VolumeReader(series_uid, pvd_images(pvd), keep_bytes=True) as reader:
            with storage.atomic_file(names["raw"], fsync=False) as fh:
                for slice_ in reader:
                    fh.write(memoryview(slice_.pixels).cast("B"))  # no copy
                    dumps.append(_dump(slice_, series_uid, private_tags))
            header = mhd_header(reader.pixel_format, reader.dimension,
                                reader.spacing(reader.plugin_pitch()), f"{index}.raw")
        storage.write_atomic(names["mhd"], header.encode("ascii"), fsync=False)
        text = tag_dump.to_json(tag_dump.common_and_unique(dumps))
        storage.write_atomic(names["json"], text.encode("utf-8"), fsync=False)
    except BaseException:
        for path in names.values():
            _remove(path)
        raise
    for path in names.values():
        os.chmod(path, 0o444)
    return names


def _dump(slice_, series_uid, private_tags=()):
    data, slice_.data = slice_.data, None
    try:
        return tag_dump.dump_file(data, private_tags)
    except tag_dump.TagDumpError as exc:
        raise VolumeError(f"Image #{slice_.number} of series {series_uid}: {exc}") from None


def dicom_tags(slice_, series_uid, private_tags=()):
    """The anonymised tag dump of a slice read with ``keep_bytes=True`` (frees the bytes)."""
    return _dump(slice_, series_uid, private_tags)


def _remove(path):
    try:
        os.chmod(path, 0o644)
        os.unlink(path)
    except OSError:
        pass


# --- single images for the image server (/rs) -----------------------------------------------

def read_slice(path, number, series_uid):
    """Decode one image file (``storage.instance_path``), on threads without an app
    context."""
    return _load(lambda: path, number, series_uid, False)


def read_stored_slice(store, key, number, series_uid):
    """Decode one stored image (``storage.instance_key``): the image server's unit of work,
    run on threads without an app context."""
    return _load(partial(store.fetch, key), number, series_uid, False)


def stored_image_attributes(store, key, number, series_uid):
    """``image_attributes`` of a stored image (``storage.instance_key``)."""
    return _attributes(partial(store.fetch, key), number, series_uid)


def image_attributes(path, number, series_uid):
    """What the image server reads besides the pixels, as CIRCUS's extractor does:
    ``window`` ({level, width} from the first values of Window Center/Width, or None),
    ``orientation`` (Image Orientation (Patient) text) and ``imageType`` (the first value
    of Image Type, e.g. ``DERIVED``)."""
    return _attributes(lambda: path, number, series_uid)


def _attributes(locate, number, series_uid):
    where = f"image #{number} of series {series_uid}"
    ds, _ = _read_header(_read(locate, number, series_uid), where)
    center, width = _text(ds, 0x00281050), _text(ds, 0x00281051)
    window = None
    if center is not None and width is not None:
        window = {"level": js_parse_float(center.split("\\")[0]),
                  "width": js_parse_float(width.split("\\")[0])}
    image_type = _text(ds, 0x00080008)
    return {"window": window, "orientation": _text(ds, 0x00200037),
            "imageType": image_type.split("\\")[0] if image_type is not None else None}
