"""A fast walk over a DICOM file's top-level header for the few values every instance needs.

pydicom builds a whole Dataset per file (~0.3 ms for a small header); an import only needs
the full data set once per *new series* (its record, API.md 3.2.1). For every other
instance the importer needs its keys and checks (character set, instance number, series
and study UIDs, Rows, Columns, Modality, Patient's Sex) and the position of the pixel data
(to refuse truncated files). ``scan`` walks the elements with ``struct`` and returns those
raw values, or None whenever anything is unusual (a transfer syntax other than
implicit/explicit little endian or explicit big endian, an unknown VR, an undefined length
outside a sequence, values beyond the bytes read...): the caller then parses the file
with pydicom exactly as before, so an odd file is never judged by this walk alone.
"""
import functools
import struct

from pydicom.uid import UID

from tag_dump import (EXPLICIT_BE, IMPLICIT_LE, ITEM, ITEM_END, LONG_LENGTH_VRS,
                      SEQUENCE_END, UNDEFINED)

DICM_OFFSET = 128
HEAD_BYTES = 64 * 1024
MAX_HEAD_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 8
PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))
# The values an instance is checked with (dicom_import.check_instance).
WANTED = frozenset((0x00080005, 0x00080060, 0x00100040, 0x0020000D, 0x0020000E, 0x00200013,
                    0x00280010, 0x00280011))
TRANSFER_SYNTAX = 0x00020010
# Element constants (UNDEFINED, ITEM..., LONG_LENGTH_VRS) are tag_dump's, the other raw
# walker. Deflated data sets are left to pydicom.
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
_LE_TAG = struct.Struct("<HH")
_BE_TAG = struct.Struct(">HH")
_LE_U16, _BE_U16 = struct.Struct("<H"), struct.Struct(">H")
_LE_U32, _BE_U32 = struct.Struct("<L"), struct.Struct(">L")


class _Unusual(Exception):
    """The walk met something it leaves to pydicom."""


class _NeedMore(Exception):
    """The walk needs bytes beyond those read."""


class Header:
    """What ``scan`` found: raw values of WANTED tags, the transfer syntax, and where the
    pixel data element starts (relative to the start of the file)."""

    __slots__ = ("values", "syntax", "little", "implicit", "pixel_offset")

    def __init__(self, values, syntax, little, implicit, pixel_offset):
        self.values = values
        self.syntax = syntax
        self.little = little
        self.implicit = implicit
        self.pixel_offset = pixel_offset

    def raw(self, tag):
        """The undecoded bytes of a top-level WANTED element, or None."""
        return self.values.get(tag)


@functools.lru_cache(maxsize=64)
def _known_little_explicit(syntax):
    uid = UID(syntax)
    return uid.is_transfer_syntax and uid.is_little_endian and not uid.is_implicit_VR


def scan(fh, size):
    """Walk the header of the DICOM file at ``fh``'s position (``size`` bytes long).

    Returns a Header, or None when the file should be parsed by pydicom instead. ``fh``
    is left at an unspecified position.
    """
    start = fh.tell()
    want = min(size, HEAD_BYTES)
    buf = fh.read(want)
    while True:
        try:
            return _walk(buf, size)
        except _NeedMore:
            if len(buf) >= size or len(buf) >= MAX_HEAD_BYTES:
                return None
            want = min(size, MAX_HEAD_BYTES, len(buf) * 4)
            fh.seek(start)
            buf = fh.read(want)
        except (_Unusual, struct.error, ValueError, UnicodeDecodeError):
            return None


def _walk(buf, size):
    end = len(buf)
    if end < DICM_OFFSET + 4 or buf[DICM_OFFSET:DICM_OFFSET + 4] != b"DICM":
        raise _Unusual()
    # File meta information: explicit VR little endian, group 0002.
    pos = DICM_OFFSET + 4
    syntax = None
    while True:
        if pos + 8 > end:
            raise _NeedMore()
        group, element = _LE_TAG.unpack_from(buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                raise _NeedMore()
            length = _LE_U32.unpack_from(buf, pos + 8)[0]
            pos += 12
        elif vr in SHORT_VRS:
            length = _LE_U16.unpack_from(buf, pos + 6)[0]
            pos += 8
        else:
            raise _Unusual()
        if length == UNDEFINED:
            raise _Unusual()
        if pos + length > end:
            raise _NeedMore()
        if element == 0x0010:
            syntax = bytes(buf[pos:pos + length]).split(b"\x00", 1)[0].decode("ascii").strip()
        pos += length
    if not syntax or syntax in DEFLATED:
        raise _Unusual()
    if syntax == IMPLICIT_LE:
        little, implicit = True, True
    elif syntax == EXPLICIT_BE:
        little, implicit = False, False
    elif _known_little_explicit(syntax):
        little, implicit = True, False
    else:
        raise _Unusual()
    values = {}
    pixel = _elements(buf, pos, end, size, little, implicit, values, 0)
    return Header(values, syntax, little, implicit, pixel)


def _elements(buf, pos, end, size, little, implicit, values, depth):
    """Walk data elements from ``pos``. At depth 0 (the top level) stop at the pixel data
    and return its offset; inside an item of undefined length stop after the item
    delimiter and return the position after it."""
    tag_struct = _LE_TAG if little else _BE_TAG
    u16 = _LE_U16 if little else _BE_U16
    u32 = _LE_U32 if little else _BE_U32
    while True:
        if pos + 8 > end:
            if depth == 0 and pos >= size:
                raise _Unusual()  # no pixel data: pydicom's path says so
            raise _NeedMore()
        group, element = tag_struct.unpack_from(buf, pos)
        tag = group << 16 | element
        if depth == 0 and tag in PIXEL_TAGS:
            return pos
        if group == 0xFFFE:
            if tag == ITEM_END and depth > 0:
                return pos + 8
            raise _Unusual()
        if implicit:
            vr = None
            length = u32.unpack_from(buf, pos + 4)[0]
            pos += 8
        else:
            vr = buf[pos + 4:pos + 6]
            if vr in SHORT_VRS:
                length = u16.unpack_from(buf, pos + 6)[0]
                pos += 8
            elif vr in LONG_LENGTH_VRS:
                if pos + 12 > end:
                    raise _NeedMore()
                length = u32.unpack_from(buf, pos + 8)[0]
                pos += 12
            else:
                raise _Unusual()
        if length == UNDEFINED:
            if vr is not None and vr != b"SQ":
                raise _Unusual()
            if tag in WANTED:
                raise _Unusual()
            pos = _sequence(buf, pos, end, size, little, implicit, depth + 1)
            continue
        if pos + length > end:
            raise _NeedMore()
        if depth == 0 and tag in WANTED:
            values[tag] = bytes(buf[pos:pos + length])
        pos += length


def _sequence(buf, pos, end, size, little, implicit, depth):
    """Skip the items of a sequence of undefined length; the position after it."""
    if depth > MAX_DEPTH:
        raise _Unusual()
    tag_struct = _LE_TAG if little else _BE_TAG
    u32 = _LE_U32 if little else _BE_U32
    while True:
        if pos + 8 > end:
            raise _NeedMore()
        group, element = tag_struct.unpack_from(buf, pos)
        tag = group << 16 | element
        length = u32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Unusual()
        if length == UNDEFINED:
            pos = _elements(buf, pos, end, size, little, implicit, {}, depth)
        else:
            if pos + length > end:
                raise _NeedMore()
            pos += length
