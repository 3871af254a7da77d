"""The anonymised DICOM tag dump of the plug-in input (``<i>.json``, API.md 5.3).

CIRCUS builds this dump from the raw elements of each file, as the JavaScript
``dicom-parser`` sees them, so the rules depend on the VR *written in the file*: with
Implicit VR Little Endian there is none and every element (sequences and pixel data
included) falls under the default string rule. pydicom converts values by dictionary VR,
so this module walks the bytes itself (``elements.Reader``).

``dump_file(data)`` gives one slice's ``{"gggg,eeee": value}`` in file order;
``common_and_unique(dumps)`` splits a volume's dumps; ``to_json`` serialises like
``JSON.stringify(value, null, 2)``, numbers included.
"""
import base64
import json
import logging
import math
import struct
import zlib
from decimal import Decimal

from pydicom import charset as dicom_charset

from dicom.elements import (DEFLATED, DICM_OFFSET, EXPLICIT_BE, IMPLICIT_LE, ITEM_END,
                            JS_WHITESPACE, SPECIFIC_CHARACTER_SET, ElementError, Reader,
                            js_string, split_meta)

log = logging.getLogger(__name__)

# Always removed, at every nesting level (patient, institution and physician tags).
PERSONAL_TAGS = frozenset(int(t, 16) for t in (
    "00080080", "00080081", "00080082", "00081040", "00081048", "00081049", "00081050",
    "00081052", "00081060", "00081062", "00081070", "00081072", "00100010", "00100020",
    "00100030", "00321031", "00321032", "00321033", "00320030"))
OMITTED_VRS = {"OB", "OW", "OD", "OF"}
TEXT_VRS = {"SH", "LO", "ST", "LT", "PN", "UT"}
NUMERIC_VRS = {"FL": ("f", 4), "FD": ("d", 8), "UL": ("I", 4), "SL": ("i", 4),
               "US": ("H", 2), "SS": ("h", 2)}
UN_MAX_BYTES = 5 * 1024 * 1024

# Specific Character Set term (its tail) -> Python codec, as CIRCUS maps them.
CHARSETS = {"IR 6": "utf-8", "IR 13": "shift_jis", "IR 100": "latin_1", "IR 101": "iso8859_2",
            "IR 109": "iso8859_3", "IR 110": "iso8859_4", "IR 144": "iso8859_5",
            "IR 127": "iso8859_6", "IR 126": "iso8859_7", "IR 138": "iso8859_8",
            "IR 148": "iso8859_9", "IR 192": "utf-8", "GB18030": "gb18030", "GBK": "gbk",
            "IR 166": "tis_620", "IR 87": "iso2022_jp", "IR 149": "euc_kr"}


class TagDumpError(ElementError):
    """Raised when a file's elements cannot be walked (truncated or not DICOM)."""


# --- text ---------------------------------------------------------------------------------

def _decoder(charset_value):
    """A ``(bytes, vr) -> str`` function for the text VRs, from Specific Character Set."""
    if not charset_value:
        return lambda raw, vr: raw.decode("latin_1")
    terms = [t.strip() for t in charset_value.split("\\")]
    if len(terms) == 1 and terms[0]:
        codec = next((c for k, c in CHARSETS.items() if terms[0].endswith(k)), None)
        if codec is None:
            log.warning("Unknown Specific Character Set %r: decoding as Latin-1", charset_value)
            codec = "latin_1"
        return lambda raw, vr: _decode_single(raw, codec)
    # Code extensions (ISO 2022 escape sequences): pydicom knows how to switch.
    encodings = dicom_charset.convert_encodings(terms)

    def decode(raw, vr):
        delimiters = {0x5E, 0x3D} if vr == "PN" else dicom_charset.TEXT_VR_DELIMS
        return dicom_charset.decode_bytes(raw, encodings, delimiters)
    return decode


def _decode_single(raw, codec):
    if codec == "iso2022_jp":  # ESC ( J and ESC ( B both mean "ASCII" here
        raw = raw.replace(b"\x1b(J", b"\x1b(B")
    elif codec == "euc_kr":
        raw = raw.replace(b"\x1b$)C", b"")
    return raw.decode(codec, errors="replace")


def _stringify_un(raw, tag):
    if len(raw) > UN_MAX_BYTES:
        raise TagDumpError(f"Data of the private tag {tag:08x} is too large")
    if all(0x20 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return "data:application/octet-stream;base64," + base64.b64encode(raw).decode("ascii")


# --- the dump -----------------------------------------------------------------------------

class _Dumper:
    def __init__(self, reader, decode, private_tags=()):
        self.reader = reader
        self.decode = decode
        self.private_tags = {int(t.replace(",", ""), 16) if isinstance(t, str) else t
                             for t in private_tags}

    def dataset(self, start, end, explicit):
        out = {}
        for tag, vr, offset, length in self.reader.elements(start, end, explicit):
            if (tag >> 16) & 1 and tag not in self.private_tags:
                continue
            if tag == ITEM_END or tag in PERSONAL_TAGS:
                continue
            value = self.value(tag, vr, offset, length, explicit)
            if value is not None:
                out[f"{tag >> 16:04x},{tag & 0xFFFF:04x}"] = value
        return out

    def value(self, tag, vr, offset, length, explicit):
        if vr in OMITTED_VRS:
            return None  # before any slicing: the pixel data is one of these
        data = self.reader.data
        if vr == "SQ":
            nested = []
            for item_start, item_length in self.reader.items(offset, length, explicit):
                item_end = None if item_length is None else item_start + item_length
                nested.append(self.dataset(item_start, item_end, explicit))
            return nested
        if vr == "AT":
            if length < 4:
                return None
            group, elem = self.reader.unpack("HH", offset)
            return f"0x{group:04x}{elem:04x}"
        if vr in NUMERIC_VRS:
            fmt, size = NUMERIC_VRS[vr]
            count = length // size
            numbers = list(struct.unpack_from(self.reader.prefix + fmt * count, data, offset))
            return numbers[0] if count == 1 else numbers
        if vr == "UN":
            return _stringify_un(data[offset:offset + length], tag)
        if vr in TEXT_VRS:
            return self.decode(data[offset:offset + length], vr)
        # js_string without copying what follows the first NUL (implicit VR pixel data)
        end = data.find(b"\x00", offset, offset + length)
        if end >= 0:
            return data[offset:end].decode("latin_1").strip(JS_WHITESPACE)
        return js_string(data[offset:offset + length])


def dump_file(data, private_tags=()):
    """The anonymised tag dump of one DICOM file (bytes), as an ordered dict."""
    try:
        return _dump_file(data, private_tags)
    except TagDumpError:
        raise
    except ElementError as exc:
        raise TagDumpError(str(exc)) from None


def _dump_file(data, private_tags):
    meta_end, syntax = split_meta(data)
    explicit = syntax != IMPLICIT_LE if syntax else _guess_explicit(data, meta_end)
    little = syntax != EXPLICIT_BE
    body = data
    if syntax == DEFLATED:
        try:
            body = data[:meta_end] + zlib.decompress(data[meta_end:], -15)
        except zlib.error:
            raise TagDumpError("The deflated dataset cannot be inflated.") from None
    reader = Reader(body, little_endian=little, explicit=explicit)
    decode = _decoder(_find_charset(reader, meta_end, explicit))
    out = {}
    if meta_end:
        meta = _Dumper(Reader(body), decode, private_tags)
        out.update(meta.dataset(DICM_OFFSET + 4, meta_end, True))
    out.update(_Dumper(reader, decode, private_tags).dataset(meta_end, None, explicit))
    return out


def _guess_explicit(data, pos):
    """Without a transfer syntax, explicit VR is assumed when two VR letters follow a tag."""
    vr = data[pos + 4:pos + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _find_charset(reader, start, explicit):
    for tag, vr, offset, length in reader.elements(start, None, explicit):
        if tag == SPECIFIC_CHARACTER_SET:
            return js_string(reader.data[offset:offset + length])
        if tag > SPECIFIC_CHARACTER_SET:
            break
    return None


# --- volume-level split and JSON ----------------------------------------------------------

def common_and_unique(dumps):
    """``{"common": ..., "unique": [...]}``: tags equal in every slice, and the rest."""
    if not dumps:
        return {"common": {}, "unique": [{}]}
    common = dict(dumps[0])
    for dump in dumps[1:]:
        for key in list(common):
            if key not in dump or dump[key] != common[key]:
                del common[key]
    unique = [{k: v for k, v in dump.items() if k not in common} for dump in dumps]
    return {"common": common, "unique": unique}


def js_number(value):
    """A number formatted as JavaScript's ``String(number)`` (NaN/Infinity as null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return "null"
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    digits = "".join(map(str, digits))
    k = len(digits)
    n = exponent + k  # the decimal point sits after n digits
    minus = "-" if sign else ""
    if k <= n <= 21:
        return minus + digits + "0" * (n - k)
    if 0 < n <= 21:
        return minus + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return minus + "0." + "0" * (-n) + digits
    exp = n - 1
    mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{minus}{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"


def to_json(value, indent=2, _level=0):
    """``JSON.stringify(value, null, indent)`` for dicts, lists, strings and numbers."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
        parts = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: "
                 f"{to_json(v, indent, _level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(parts) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        pad, inner = " " * (indent * _level), " " * (indent * (_level + 1))
        return ("[\n" + ",\n".join(inner + to_json(v, indent, _level + 1) for v in value)
                + "\n" + pad + "]")
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (bool, int, float)):
        return js_number(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
