"""The one raw DICOM element reader and its constants (VRs, delimiters, transfer syntaxes).

Three readers walk the bytes of a Part 10 file without pydicom: the fast header scan of
the importer (``header_scan``), the plug-in tag dump (``tag_dump``) and the volume
loader's header (``volumes``). They all read elements here, with one set of constants:

- ``Reader`` walks the elements of a (sub-)data set in a buffer, as dicom-parser does
  (the tag dump and the volume loader); a buffer that ends too early raises ElementError;
- ``walk_header`` is the strict, bounded walk of the importer's hot path: the file meta
  and the top-level elements up to the pixel data, raising ``NeedMore`` when the buffer
  is too short and ``Unusual`` for anything it leaves to pydicom;
- ``check_pixel_data`` reads the pixel data element header to refuse truncated files.
"""
import functools
import struct

from pydicom.uid import UID

from dicom.errors import BrokenDicomError

# --- constants ----------------------------------------------------------------------------

DICM_OFFSET = 128  # the preamble; "DICM" follows
META_GROUP = 0x0002
TRANSFER_SYNTAX = 0x00020010
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_DATA = 0x7FE00010
PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))  # (float / double) pixel data
FIRST_PIXEL_TAG = 0x7FE00008

# Value lengths and delimiters (PS3.5 7.1, 7.5)
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"

# Explicit VRs: those with a 4-byte length (after two reserved bytes), those with a 2-byte one
LONG_LENGTH_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                             b"UN", b"UR", b"UT", b"UV"))
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
KNOWN_VRS = frozenset(vr.decode("ascii") for vr in LONG_LENGTH_VRS | SHORT_VRS)

# Transfer syntaxes
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"  # deflated explicit VR little endian data set
# Left to pydicom by the header walk: the deflated data set, and Deflated Image Frame
# Compression (its data set is plain, but the walk has never been checked against it).
DEFLATED_SYNTAXES = frozenset((DEFLATED, "1.2.840.10008.1.2.8.1"))
NATIVE_LITTLE_ENDIAN = frozenset((IMPLICIT_LE, EXPLICIT_LE))

JS_WHITESPACE = " \t\n\v\f\r\xa0"  # what JavaScript's trim() removes in the Latin-1 range
MAX_DEPTH = 8  # nested sequences the header walk follows

_LE_TAG, _BE_TAG = struct.Struct("<HH"), struct.Struct(">HH")
_LE_U16, _BE_U16 = struct.Struct("<H"), struct.Struct(">H")
_LE_U32, _BE_U32 = struct.Struct("<L"), struct.Struct(">L")
# (tag, 32-bit length, 16-bit length) readers per byte order
_STRUCTS = {"<": (_LE_TAG, _LE_U32, _LE_U16), ">": (_BE_TAG, _BE_U32, _BE_U16)}


class ElementError(ValueError):
    """Raised when elements cannot be walked (a truncated or malformed data set)."""


def is_dicm(head):
    """Whether the first bytes of a file carry the ``DICM`` prefix at offset 128."""
    return len(head) >= DICM_OFFSET + 4 and head[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def js_string(raw):
    """dicom-parser's ``string()``: Latin-1 up to the first NUL, trimmed; None when empty."""
    if not raw:
        return None
    end = raw.find(b"\x00")
    if end >= 0:
        raw = raw[:end]
    return raw.decode("latin_1").strip(JS_WHITESPACE)


# --- the general reader (tag dump, volume loader) -----------------------------------------

class Reader:
    """Walks the elements of one (sub-)dataset in a byte buffer."""

    def __init__(self, data, little_endian=True, explicit=True):
        self.data = data
        self.prefix = "<" if little_endian else ">"
        self.explicit = explicit
        self._tag, self._u32, self._u16 = _STRUCTS[self.prefix]

    def unpack(self, fmt, pos):
        try:
            return struct.unpack_from(self.prefix + fmt, self.data, pos)
        except struct.error:
            raise ElementError("The DICOM file is truncated.") from None

    def header(self, pos, explicit=None):
        """(tag, vr or None, length, value offset) of the element at ``pos``."""
        explicit = self.explicit if explicit is None else explicit
        data = self.data
        try:
            group, elem = self._tag.unpack_from(data, pos)
            tag = (group << 16) | elem
            if tag in (ITEM, ITEM_END, SEQUENCE_END) or not explicit:
                return tag, None, self._u32.unpack_from(data, pos + 4)[0], pos + 8
            vr = data[pos + 4:pos + 6]
            if vr in LONG_LENGTH_VRS:
                return tag, vr.decode("ascii"), self._u32.unpack_from(data, pos + 8)[0], pos + 12
            return (tag, vr.decode("ascii", errors="replace"),
                    self._u16.unpack_from(data, pos + 6)[0], pos + 8)
        except struct.error:
            raise ElementError("The DICOM file is truncated.") from None

    def skip_items(self, pos, explicit):
        """The offset just after a sequence of items ended by a sequence delimiter."""
        while True:
            tag, _vr, length, start = self.header(pos, explicit=False)
            if tag == SEQUENCE_END:
                return start
            if tag != ITEM:
                raise ElementError("Malformed sequence.")
            if length == UNDEFINED:
                pos = self.skip_dataset(start, explicit)
            else:
                pos = start + length

    def skip_dataset(self, pos, explicit):
        """The offset just after an undefined-length item (after its delimiter)."""
        while True:
            tag, vr, length, start = self.header(pos, explicit)
            if tag == ITEM_END:
                return start
            pos = self._end_of_value(tag, vr, length, start, explicit)

    def _end_of_value(self, tag, vr, length, start, explicit):
        if length != UNDEFINED:
            return start + length
        if vr == "UN":  # an undefined-length UN is an implicit-VR sequence
            return self.skip_items(start, False)
        return self.skip_items(start, explicit)

    def items(self, start, length, explicit):
        """(offset, length) of each item of a sequence value."""
        end = None if length == UNDEFINED else start + length
        pos, found = start, []
        while end is None or pos < end:
            tag, _vr, item_length, item_start = self.header(pos, explicit=False)
            if tag == SEQUENCE_END:
                break
            if tag != ITEM:
                raise ElementError("Malformed sequence.")
            if item_length == UNDEFINED:
                pos = self.skip_dataset(item_start, explicit)
                found.append((item_start, None))
            else:
                pos = item_start + item_length
                found.append((item_start, item_length))
        return found

    def elements(self, start, end, explicit):
        """Yield (tag, vr, value offset, value length) until ``end`` or an item delimiter."""
        pos = start
        while pos < (len(self.data) if end is None else end):
            tag, vr, length, value = self.header(pos, explicit)
            if tag == ITEM_END:
                return
            pos = self._end_of_value(tag, vr, length, value, explicit)
            yield tag, vr, value, (pos - value)


def split_meta(data):
    """(meta elements end, transfer syntax UID) of a Part 10 file; (0, None) without DICM."""
    if not is_dicm(data):
        return 0, None
    reader = Reader(data)
    pos, syntax = DICM_OFFSET + 4, None
    while pos + 8 <= len(data):
        tag, vr, length, value = reader.header(pos, explicit=True)
        if tag >> 16 != META_GROUP:
            break
        if tag == TRANSFER_SYNTAX:
            syntax = js_string(data[value:value + length])
        pos = value + length
    return pos, syntax


# --- the importer's bounded header walk ---------------------------------------------------

class Unusual(Exception):
    """The walk met something it leaves to pydicom."""


class NeedMore(Exception):
    """The walk needs bytes beyond those read."""


@functools.lru_cache(maxsize=64)
def _known_little_explicit(syntax):
    uid = UID(syntax)
    return uid.is_transfer_syntax and uid.is_little_endian and not uid.is_implicit_VR


def walk_header(buf, size, wanted, vrs=None):
    """Walk a Part 10 file's meta and top-level elements up to its pixel data.

    ``buf`` holds the first bytes of a file of ``size`` bytes. Returns ``(values, syntax,
    little, implicit, pixel offset)`` where ``values`` maps each top-level tag of
    ``wanted`` found to its undecoded bytes; ``vrs``, when given, receives the explicit VR
    (text) of each of them.

    Raises
    ------
    NeedMore
        When the walk needs bytes beyond ``buf``.
    Unusual
        For anything left to pydicom: a transfer syntax other than implicit/explicit little
        endian or explicit big endian, an unknown VR, an undefined length outside a
        sequence, a wanted element of undefined length, no pixel data...
    """
    end = len(buf)
    if end < DICM_OFFSET + 4 or buf[DICM_OFFSET:DICM_OFFSET + 4] != b"DICM":
        raise Unusual()
    # File meta information: explicit VR little endian, group 0002.
    pos = DICM_OFFSET + 4
    syntax = None
    while True:
        if pos + 8 > end:
            raise NeedMore()
        group, element = _LE_TAG.unpack_from(buf, pos)
        if group != META_GROUP:
            break
        vr = buf[pos + 4:pos + 6]
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                raise NeedMore()
            length = _LE_U32.unpack_from(buf, pos + 8)[0]
            pos += 12
        elif vr in SHORT_VRS:
            length = _LE_U16.unpack_from(buf, pos + 6)[0]
            pos += 8
        else:
            raise Unusual()
        if length == UNDEFINED:
            raise Unusual()
        if pos + length > end:
            raise NeedMore()
        if element == 0x0010:
            syntax = bytes(buf[pos:pos + length]).split(b"\x00", 1)[0].decode("ascii").strip()
        pos += length
    if not syntax or syntax in DEFLATED_SYNTAXES:
        raise Unusual()
    if syntax == IMPLICIT_LE:
        little, implicit = True, True
    elif syntax == EXPLICIT_BE:
        little, implicit = False, False
    elif _known_little_explicit(syntax):
        little, implicit = True, False
    else:
        raise Unusual()
    values = {}
    pixel = _walk_elements(buf, pos, end, size, little, implicit, values, wanted, 0,
                           {} if vrs is None else vrs)
    return values, syntax, little, implicit, pixel


def _walk_elements(buf, pos, end, size, little, implicit, values, wanted, depth, vrs=None):
    """Walk data elements from ``pos``. At depth 0 (the top level) stop at the pixel data
    and return its offset; inside an item of undefined length stop after the item
    delimiter and return the position after it."""
    tag_struct = _LE_TAG if little else _BE_TAG
    u16 = _LE_U16 if little else _BE_U16
    u32 = _LE_U32 if little else _BE_U32
    while True:
        if pos + 8 > end:
            if depth == 0 and pos >= size:
                raise Unusual()  # no pixel data: pydicom's path says so
            raise NeedMore()
        group, element = tag_struct.unpack_from(buf, pos)
        tag = group << 16 | element
        if depth == 0 and tag in PIXEL_TAGS:
            return pos
        if group == 0xFFFE:
            if tag == ITEM_END and depth > 0:
                return pos + 8
            raise Unusual()
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
                    raise NeedMore()
                length = u32.unpack_from(buf, pos + 8)[0]
                pos += 12
            else:
                raise Unusual()
        if length == UNDEFINED:
            if vr is not None and vr != b"SQ":
                raise Unusual()
            if tag in wanted:
                raise Unusual()
            pos = _walk_sequence(buf, pos, end, size, little, implicit, wanted, depth + 1)
            continue
        if pos + length > end:
            raise NeedMore()
        if depth == 0 and tag in wanted:
            values[tag] = bytes(buf[pos:pos + length])
            if vr is not None:
                vrs[tag] = vr.decode("latin-1")
        pos += length


def _walk_sequence(buf, pos, end, size, little, implicit, wanted, depth):
    """Skip the items of a sequence of undefined length; the position after it."""
    if depth > MAX_DEPTH:
        raise Unusual()
    tag_struct = _LE_TAG if little else _BE_TAG
    u32 = _LE_U32 if little else _BE_U32
    while True:
        if pos + 8 > end:
            raise NeedMore()
        group, element = tag_struct.unpack_from(buf, pos)
        tag = group << 16 | element
        length = u32.unpack_from(buf, pos + 4)[0]
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise Unusual()
        if length == UNDEFINED:
            pos = _walk_elements(buf, pos, end, size, little, implicit, {}, wanted, depth)
        else:
            if pos + length > end:
                raise NeedMore()
            pos += length


# --- pixel data -----------------------------------------------------------------------------

MAX_FRAGMENTS = 1 << 20  # fragments of one encapsulated pixel data element walked at most


class PixelData:
    """Where a file's pixel data is and how long it is: ``length`` is the value length of
    native pixel data, None for encapsulated pixel data (``fragments_total`` then sums its
    fragments)."""

    __slots__ = ("fh", "value_start", "end", "little", "length")

    def __init__(self, fh, value_start, end, little, length):
        self.fh = fh
        self.value_start = value_start
        self.end = end
        self.little = little
        self.length = length

    def first_fragment(self, size):
        """Up to ``size`` first bytes of the first fragment after the offset table (the
        start of the first frame) of encapsulated pixel data, or None."""
        tag_struct, u32, _u16 = _STRUCTS["<" if self.little else ">"]
        pos = self.value_start
        for index in range(2):
            self.fh.seek(pos)
            header = self.fh.read(8)
            if len(header) < 8:
                return None
            group, element = tag_struct.unpack(header[:4])
            length = u32.unpack(header[4:])[0]
            if (group << 16 | element) != ITEM or length == UNDEFINED:
                return None
            if index == 1:
                return self.fh.read(min(length, size))
            pos += 8 + length
        return None

    def fragments_total(self, bound):
        """The sum of the fragment lengths (offset table included), reading item headers
        only; the walk stops as soon as the sum is over ``bound`` (and returns it).

        Raises
        ------
        BrokenDicomError
            For a malformed fragment sequence.
        """
        if self.end - self.value_start <= bound:
            return self.end - self.value_start  # the fragments cannot sum to more
        tag_struct, u32, _u16 = _STRUCTS["<" if self.little else ">"]
        fh, pos, total = self.fh, self.value_start, 0
        for _ in range(MAX_FRAGMENTS):
            fh.seek(pos)
            header = fh.read(8)
            if len(header) < 8:
                break
            group, element = tag_struct.unpack(header[:4])
            tag = group << 16 | element
            if tag == SEQUENCE_END:
                return total
            length = u32.unpack(header[4:])[0]
            if tag != ITEM or length == UNDEFINED:
                break
            total += length
            if total > bound:
                return total
            pos += 8 + length
        raise BrokenDicomError("The encapsulated Pixel Data (7FE0,0010) is malformed.")


def check_pixel_data(fh, end, syntax):
    """Refuse a file whose pixel data element is missing or shorter than declared; return
    its PixelData.

    ``fh`` is at the element that should be the pixel data; ``end`` is the file's end;
    ``syntax`` a pydicom UID.

    Raises
    ------
    BrokenDicomError
    """
    position = fh.tell()
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    header = fh.read(12)
    truncated = BrokenDicomError("The DICOM file has no pixel data or is truncated.")
    if len(header) < 8:
        raise truncated
    tag_struct, u32, _u16 = _STRUCTS["<" if little else ">"]
    group, element = tag_struct.unpack(header[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
        raise truncated
    if implicit:
        length, header_size = u32.unpack(header[4:8])[0], 8
    else:
        if len(header) < 12:
            raise truncated
        length, header_size = u32.unpack(header[8:12])[0], 12
    value_start = position + header_size
    if length != UNDEFINED:
        if value_start + length > end:
            raise truncated
        return PixelData(fh, value_start, end, little, length)
    # Encapsulated pixel data ends with a sequence delimiter (maybe followed by padding).
    tail_size = min(end - position, 1024 * 1024)
    fh.seek(end - tail_size)
    tail = fh.read(tail_size)
    if SEQUENCE_DELIMITER_LE not in tail and SEQUENCE_DELIMITER_BE not in tail:
        raise truncated
    return PixelData(fh, value_start, end, little, None)
