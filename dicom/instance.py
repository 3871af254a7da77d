"""What a DICOM instance must be, and what we keep from it: the home of the DICOM rules.

The *rules* (``@rule``) are the checks every imported instance passes (API.md 3.2.1,
with CIRCUS's messages). Each declares the top-level tags it reads: the importer's fast
header scan (``header_scan``) reads exactly the tags the rules declare, so a new rule is
checked on the fast path as on pydicom's. ``check_instance`` runs them in order.

The rules also hold what a standard reader needs to open the file later (issue 13): the
Image Pixel elements must have their dictionary VR and values that parse
(``check_vrs``, ``_image_pixel``), and the pixel data must be about the size those
elements imply (``check_pixel_size``). The fast scan and pydicom's path run the same checks.

The *record* (``extract_record``) is what a series row keeps from the first instance of
a new series: its columns, ``patient_info`` and ``parameters``, read from pydicom's data
set of the whole header (``read_dataset``, which also refuses truncated files).
"""
import functools
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from typing import NamedTuple
from datetime import datetime, timedelta
from typing import NamedTuple

import pydicom
from flask import current_app
from pydicom import charset as dicom_charset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.uid import UID

from dicom.elements import (DICM_OFFSET, KNOWN_VRS, PIXEL_TAGS, PixelData, check_pixel_data,
                            is_dicm)
from dicom.errors import BrokenDicomError, DicomImportError, InvalidInstanceError, NotDicomError
from models import iso

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
TZ_RE = re.compile(r"^([+-])(\d\d)(\d\d)$")
AGE_RE = re.compile(r"^(\d{3})([DWMY])$")
INT_RE = re.compile(r"^[+-]?\d+")
FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
PARAMETER_GROUPS = (0x0018, 0x0020, 0x0028)
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
PN_DELIMITERS = {0x5E, 0x3D}
NUMERIC_VRS = {"FL": ("f", 4), "FD": ("d", 8), "UL": ("L", 4), "SL": ("l", 4),
               "US": ("H", 2), "SS": ("h", 2)}


# --- header reading ---------------------------------------------------------------------

def read_dataset(fh, size):
    """Parse a DICOM file's header (no pixel data) from a seekable binary file.

    Also checks that the pixel data is present and complete, so a truncated file is
    refused even though its header parses.

    Raises
    ------
    NotDicomError, BrokenDicomError
    """
    return read_checked(fh, size)[0]


def read_checked(fh, size):
    """``read_dataset``, returning ``(dataset, PixelData)``; ``fh`` must stay open while
    the PixelData is used.

    Raises
    ------
    NotDicomError, BrokenDicomError
    """
    start = fh.tell()
    if not is_dicm(fh.read(DICM_OFFSET + 4)):
        raise NotDicomError("The file is not a DICOM file.")
    fh.seek(start)
    try:
        dataset = pydicom.dcmread(fh, stop_before_pixels=True)
        syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 "))
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            fh.seek(start)
            full = pydicom.dcmread(fh)
            tag = next((tag for tag in sorted(PIXEL_TAGS) if tag in full), None)
            if tag is None:
                raise BrokenDicomError("The DICOM file has no pixel data or is truncated.")
            elem = full.get_item(tag)
            value = bytes(elem.value)
            undefined = getattr(elem, "is_undefined_length", False)
            pixels = PixelData(io.BytesIO(value), 0, len(value), True,
                               None if undefined else len(value))
        else:
            pixels = check_pixel_data(fh, start + size, syntax)
    except DicomImportError:
        raise
    except Exception as exc:  # pydicom's many ways of failing on untrusted bytes
        raise BrokenDicomError(f"The DICOM file cannot be parsed ({type(exc).__name__}).") from None
    return dataset, pixels


def check_readable(dataset):
    """Refuse a parsed header that a standard reader could open but not read: an unknown
    transfer syntax, or a top-level element whose value does not decode (the pydicom
    path only: pydicom parses leniently and decodes values when they are first used).

    Raises
    ------
    BrokenDicomError
    """
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    if not UID(syntax).is_transfer_syntax:
        raise BrokenDicomError(f"The transfer syntax {syntax!r} is not one a DICOM reader "
                               "knows.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of odd values it still reads
        try:
            encoding = dataset._character_set
        except Exception:
            raise BrokenDicomError("The Specific Character Set (0008,0005) cannot be "
                                   "read.") from None
        for tag in list(dataset.keys()):
            elem = _element(dataset, tag)
            if not isinstance(elem, RawDataElement):
                continue
            try:  # a converted copy: the data set keeps its raw values for the rules
                convert_raw_data_element(elem, encoding=encoding, ds=dataset)
            except Exception as exc:
                raise BrokenDicomError(f"The value of {tag_name(tag)} cannot be read "
                                       f"({type(exc).__name__}).") from None


# --- value decoding ---------------------------------------------------------------------

def _element(dataset, tag):
    """A top-level element as read (raw when not yet decoded), or None. An empty raw
    value stays raw: pydicom would decode it, and fail on an unknown VR."""
    try:
        return dataset.get_item(tag, keep_deferred=True)
    except (KeyError, ValueError):
        return None


def raw_bytes(dataset, tag):
    """The undecoded value bytes of a top-level element, or None."""
    elem = _element(dataset, tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).encode("latin-1", "replace")
    return str(value).encode("latin-1", "replace")


def _ascii(raw):
    """A value as CIRCUS's parser reads strings: up to the first NUL, trimmed."""
    if raw is None or len(raw) == 0:
        return None
    return raw.split(b"\x00", 1)[0].decode("latin-1").strip()


class Decoder:
    """Decodes the text of one data set with its Specific Character Set."""

    def __init__(self, raw_charset):
        raw = _ascii(raw_charset)
        self.encodings = None
        if raw:
            names = [name.strip() for name in raw.split("\\")]
            if names[0] == "":
                names[0] = "ISO_IR 6"
            if not all(name in dicom_charset.python_encoding for name in names):
                raise InvalidInstanceError(f"Could not find a encoding {raw}")
            self.encodings = dicom_charset.convert_encodings(names)

    def text(self, raw, trim=True):
        if raw is None or len(raw) == 0:
            return None
        if self.encodings is None:
            value = raw.decode("latin-1")
        else:
            try:
                value = dicom_charset.decode_bytes(raw, self.encodings, PN_DELIMITERS)
            except Exception:  # undecodable bytes in a text value: keep what latin-1 gives
                value = raw.decode("latin-1")
        value = value.replace("\x00", "")
        return value.strip() if trim else value


def _number(text):
    """JavaScript's Number(text) for DS/IS values; None when it is not a finite number."""
    text = text.strip()
    if text == "":
        return 0
    try:
        value = float(text)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _leading_float(text):
    """JavaScript's parseFloat: the leading number of a string, or None."""
    match = FLOAT_RE.match(text.strip()) if text is not None else None
    if match is None:
        return None
    value = float(match.group(0))
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _nth_float(dataset, tag, index):
    text = _ascii(raw_bytes(dataset, tag))
    if text is None:
        return None
    values = text.split("\\")
    return _leading_float(values[index]) if index < len(values) else None


def _binary_numbers(raw, vr, little):
    fmt, size = NUMERIC_VRS[vr]
    count = len(raw) // size
    if count == 0:
        return None
    values = struct.unpack(("<" if little else ">") + fmt * count, raw[:count * size])
    values = [v if not isinstance(v, float) or v == v else None for v in values]
    values = [int(v) if isinstance(v, float) and v is not None and v.is_integer()
              and abs(v) < 2 ** 53 else v for v in values]
    return values[0] if count == 1 else values


def _parameter_value(dataset, elem, vr, decoder, little, pixel_representation):
    """One parameter, typed by the dictionary VR as CIRCUS does (3.2.1)."""
    if " or " in vr:
        choices = vr.split(" or ")
        if all(v in ("US", "SS") for v in choices) and pixel_representation in (0, 1):
            vr = "US" if pixel_representation == 0 else "SS"
    value = elem.value
    if vr == "SQ" or not isinstance(value, (bytes, bytearray)):
        if isinstance(value, (bytes, bytearray)):
            return _ascii(bytes(value))
        # A parsed sequence: CIRCUS reads its first item tag as text.
        if vr == "SQ" or elem.VR == "SQ":
            if not value:
                return None
            return _ascii(b"\xfe\xff\x00\xe0" if little else b"\xff\xfe\xe0\x00")
        return _ascii(raw_bytes(dataset, elem.tag))
    raw = bytes(value)
    if vr in NUMERIC_VRS:
        return _binary_numbers(raw, vr, little)
    if vr in ("DS", "IS"):
        text = _ascii(raw)
        if text is None:
            return None
        if "\\" in text:
            return [_number(part) for part in text.split("\\")]
        return _number(text)
    if vr == "AT":
        if len(raw) < 2:
            return None
        group = struct.unpack("<H" if little else ">H", raw[:2])[0]
        return "0x" + f"{group:04x}" * 2  # (sic) CIRCUS reads the group twice
    if vr in TEXT_VRS:
        return decoder.text(raw)
    return _ascii(raw)


def extract_parameters(dataset, decoder=None):
    """The ``parameters`` object of an instance (3.2.1)."""
    decoder = decoder or Decoder(raw_bytes(dataset, 0x00080005))
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    little = UID(syntax).is_little_endian if UID(syntax).is_transfer_syntax else True
    params = {"TransferSyntaxUID": syntax or None,
              "pixelSpacingX": _nth_float(dataset, 0x00280030, 0),
              "pixelSpacingY": _nth_float(dataset, 0x00280030, 1),
              "imagePositionPatientZ": _nth_float(dataset, 0x00200032, 2),
              "PixelValueUnits": _ascii(raw_bytes(dataset, 0x00541001))}
    pixel_representation = None
    raw_pr = raw_bytes(dataset, 0x00280103)
    if raw_pr and len(raw_pr) >= 2:
        pixel_representation = struct.unpack("<H" if little else ">H", raw_pr[:2])[0]
    for tag in list(dataset.keys()):
        if tag.group not in PARAMETER_GROUPS:
            continue
        keyword = keyword_for_tag(tag)
        if not keyword:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        elem = _element(dataset, tag)
        if elem is None:
            continue
        try:
            params[keyword] = _parameter_value(dataset, elem, vr, decoder, little,
                                               pixel_representation)
        except (struct.error, ValueError, TypeError):
            params[keyword] = None
    return {k: v for k, v in params.items() if v is not None}


# --- dates and patient ------------------------------------------------------------------

def utc_offset_minutes(dataset, default_offset):
    """Minutes east of UTC from Timezone Offset From UTC (0008,0201), else the default.

    The intended rule (quirk 12 fixed): ``+0930`` is 9 * 60 + 30 = 570 minutes.
    """
    match = TZ_RE.match(_ascii(raw_bytes(dataset, 0x00080201)) or "")
    if match is None:
        return default_offset
    sign = -1 if match.group(1) == "-" else 1
    return sign * (int(match.group(2)) * 60 + int(match.group(3)))


def _digits(text):
    return int(text) if text.isdigit() else (0 if text == "" else None)


def local_datetime(date_text, time_text):
    """A DICOM DA + TM pair as a naive local datetime (3.2.1 parsing), or None."""
    if not date_text:
        return None
    date_text = re.sub(r"[-/.]", "", date_text)
    if len(date_text) != 8 or not date_text.isdigit():
        return None
    time_text = re.sub(r"[: ]", "", time_text) if time_text else "000000.000000"
    parts = [_digits(time_text[0:2]), _digits(time_text[2:4]), _digits(time_text[4:6])]
    fraction = (time_text[7:] + "000000")[:6]
    if None in parts or not fraction.isdigit():
        return None
    try:
        day = datetime(int(date_text[0:4]), int(date_text[4:6]), int(date_text[6:8]))
    except ValueError:
        return None
    hours, minutes, seconds = parts
    return day + timedelta(hours=hours, minutes=minutes, seconds=seconds,
                           milliseconds=int(fraction) // 1000)


def _age(age_text, birth_text, reference):
    """Patient age in years (3.2.1): from (0010,1010) ``nnnY`` etc., else from birth date.

    The age from a birth date compares calendar dates as written in the file (the local
    study date), not in the server's time zone: a conscious normalisation of quirk 34.
    """
    match = AGE_RE.match(age_text or "")
    if match:
        nnn, unit = int(match.group(1)), match.group(2)
        return {"Y": nnn, "M": nnn // 12, "W": nnn * 7 // 365, "D": nnn // 365}[unit]
    birth = local_datetime(birth_text, None)
    if birth is None or reference is None:
        return None
    years = reference.year - birth.year
    if (reference.month, reference.day) < (birth.month, birth.day):
        years -= 1
    return years


def _patient_info(dataset, decoder, reference):
    raw_name = raw_bytes(dataset, 0x00100010)
    birth = _ascii(raw_bytes(dataset, 0x00100030))
    sex = _ascii(raw_bytes(dataset, 0x00100040))
    info = {
        "patientId": decoder.text(raw_bytes(dataset, 0x00100020)),
        # Not trimmed (quirk 34, compat): the padding space stays, as in existing data.
        "patientName": decoder.text(raw_name, trim=False) if raw_name else None,
        "age": _age(_ascii(raw_bytes(dataset, 0x00101010)), birth, reference),
        "birthDate": f"{birth[0:4]}-{birth[4:6]}-{birth[6:8]}" if birth and len(birth) == 8 else None,
        "sex": sex or None,
        "size": _nth_float(dataset, 0x00101020, 0),
        "weight": _nth_float(dataset, 0x00101030, 0),
    }
    return {k: v for k, v in info.items() if v is not None}


def _uint16(raw, little):
    if raw is None or len(raw) < 2:
        return None
    return struct.unpack("<H" if little else ">H", raw[:2])[0]


# --- the Image Pixel module -------------------------------------------------------------

SAMPLES_PER_PIXEL, PHOTOMETRIC, PLANAR_CONFIGURATION = 0x00280002, 0x00280004, 0x00280006
NUMBER_OF_FRAMES, ROWS, COLUMNS = 0x00280008, 0x00280010, 0x00280011
BITS_ALLOCATED, BITS_STORED, HIGH_BIT = 0x00280100, 0x00280101, 0x00280102
PIXEL_REPRESENTATION = 0x00280103
PHOTOMETRICS = frozenset(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB",
                          "CMYK", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
                          "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"))
FRAMES_RE = re.compile(r"^\+?\d{1,9}$")
# Pixel data may exceed what the header implies by this much: real files carry a little
# padding (an odd length's pad byte, a trailing even-length pad, encoders' spare bytes),
# and a compressed frame can be larger than its raw pixels. Twice the implied size plus
# 64 KiB keeps all of those and still refuses a gigabyte behind an 8x8 header.
PIXEL_SLACK_BYTES = 64 * 1024
# VRs read as text: one of them in place of another changes nothing in how it is read.
TEXT_READ_VRS = frozenset(("AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                           "UC", "UI", "UR", "UT"))


def tag_name(tag):
    """``Rows (0028,0010)``: a tag as messages name it."""
    keyword = keyword_for_tag(tag)
    return f"{keyword + ' ' if keyword else ''}({tag >> 16:04X},{tag & 0xFFFF:04X})"


@functools.lru_cache(maxsize=256)
def _dictionary_vrs(tag):
    try:
        return frozenset(dictionary_VR(tag).split(" or "))
    except KeyError:
        return None


_GOOD_VRS = set()  # (tag, VR) pairs check_vrs accepted


def check_vrs(vrs):
    """Refuse an explicit VR a reader would not read as the dictionary says: ``vrs`` maps
    the wanted tags found to the VR in the file (implicit VR files have none). An unknown
    VR is refused; UN is read with the dictionary VR (pydicom does too).

    Raises
    ------
    InvalidInstanceError
    """
    if _GOOD_VRS.issuperset(vrs.items()):  # the common case, in one C-level pass
        return
    for tag, vr in vrs.items():
        if (tag, vr) in _GOOD_VRS:
            continue
        if vr not in KNOWN_VRS:
            raise InvalidInstanceError(f"{tag_name(tag)} has the unknown VR {vr!r}.")
        expected = _dictionary_vrs(tag)
        if (expected is None or vr in expected or vr == "UN"
                or (vr in TEXT_READ_VRS and expected <= TEXT_READ_VRS)):
            _GOOD_VRS.add((tag, vr))  # bounded: known VRs of the wanted tags
            continue
        raise InvalidInstanceError(f"{tag_name(tag)} has the VR {vr}, not "
                                   f"{' or '.join(sorted(expected))}.")


def dataset_vrs(dataset):
    """The explicit VRs of the wanted tags of a parsed header (``check_vrs``)."""
    vrs = {}
    for tag in wanted_tags():
        elem = _element(dataset, tag)
        vr = getattr(elem, "VR", None) if elem is not None else None
        if vr is not None and getattr(elem, "is_implicit_VR", False) is False:
            vrs[tag] = str(vr)
    return vrs


_US = {True: struct.Struct("<H").unpack, False: struct.Struct(">H").unpack}


def _us(raw, tag, little, required=True):
    """One US value (exactly two bytes), or None when absent and not ``required``."""
    value = raw(tag)
    if value is not None and len(value) == 2:
        return _US[little](value)[0]
    if not value:
        if required:
            raise InvalidInstanceError(f"{tag_name(tag)} of this DICOM file is not set.")
        return None
    raise InvalidInstanceError(f"{tag_name(tag)} of this DICOM file is not one unsigned "
                               f"16-bit value ({len(value)} bytes).")


def _frames(raw):
    text = _ascii(raw(NUMBER_OF_FRAMES))
    if not text:
        return 1  # absent or empty: one frame, as readers take it
    if not FRAMES_RE.match(text) or int(text) < 1:
        raise InvalidInstanceError(f"{tag_name(NUMBER_OF_FRAMES)} of this DICOM file is "
                                   f"not a positive integer ({text!r}).")
    return int(text)


class ImagePixel(NamedTuple):
    """What the Image Pixel elements say of the pixel data (the ``image_pixel`` rule)."""
    rows: int
    columns: int
    samples: int
    implied: int  # bytes of native pixel data


# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC), and JPEG-LS's SOF55
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
FRAME_HEAD_BYTES = 4096


def frame_size(head):
    """(rows, columns, samples) that a JPEG, JPEG-LS or JPEG 2000 codestream declares in
    its first bytes ``head``, or None (another codec, or not found in ``head``)."""
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 42:  # SOC, SIZ
        x, y, x0, y0 = struct.unpack(">IIII", head[8:24])
        return y - y0, x - x0, struct.unpack(">H", head[40:42])[0]
    if head[:2] != b"\xff\xd8":  # SOI
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_SOF_MARKERS:
            if pos + 10 > len(head):
                return None
            _precision, rows, columns, samples = struct.unpack(">BHHB", head[pos + 4:pos + 10])
            return rows, columns, samples
        pos += 2 + struct.unpack(">H", head[pos + 2:pos + 4])[0]
    return None


def check_pixel_size(pixels, image):
    """Refuse pixel data shorter than the header implies (native), far larger, or whose
    first frame (JPEG, JPEG-LS, JPEG 2000) has other dimensions than the header's.

    Raises
    ------
    BrokenDicomError
    """
    implied = image.implied
    bound = 2 * implied + PIXEL_SLACK_BYTES
    if pixels.length is not None:
        if pixels.length < implied:
            raise BrokenDicomError(f"The Pixel Data (7FE0,0010) is shorter ({pixels.length} "
                                   f"bytes) than the header implies ({implied} bytes).")
        if pixels.length > bound:
            raise BrokenDicomError(f"The Pixel Data (7FE0,0010) is larger ({pixels.length} "
                                   f"bytes) than the header implies ({implied} bytes).")
        return
    total = pixels.fragments_total(bound)
    if total > bound:
        raise BrokenDicomError(f"The encapsulated Pixel Data (7FE0,0010) is larger (over "
                               f"{bound} bytes) than the header implies ({implied} bytes).")
    head = pixels.first_fragment(FRAME_HEAD_BYTES)
    found = frame_size(head) if head else None
    expected = (image.rows, image.columns, image.samples)
    if found is not None and found != expected and not (found[0] == 0 and
                                                        found[1:] == expected[1:]):
        # (A JPEG frame may leave its height to a later DNL marker: rows 0.)
        raise BrokenDicomError(
            "The first frame of the Pixel Data (7FE0,0010) is {} x {} x {} (rows x columns x "
            "samples), not {} x {} x {} as the header says.".format(*found, *expected))


# --- the rules --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One check of every instance: ``check(raw, little)`` reads only ``tags``.

    ``raw(tag)`` gives the undecoded bytes of a top-level element (or None); ``little``
    is the byte order. ``check`` raises InvalidInstanceError, or returns a value kept
    under ``name`` (None when the rule keeps nothing).
    """
    name: str
    tags: tuple
    check: object


RULES = []  # in the order they run: the first failing rule gives the message
_wanted = [None]  # the union of the rules' tags, computed once per change of RULES


def rule(name, *tags):
    """Declare a rule reading ``tags`` (a decorator of ``check(raw, little)``)."""
    def declare(check):
        RULES.append(Rule(name, tuple(tags), check))
        _wanted[0] = None
        return check
    return declare


def remove_rule(name):
    """Withdraw the rules named ``name`` (tests declaring a rule of their own)."""
    RULES[:] = [r for r in RULES if r.name != name]
    _wanted[0] = None


def wanted_tags():
    """The top-level tags the rules read: what the fast header scan keeps."""
    wanted = _wanted[0]
    if wanted is None:
        wanted = _wanted[0] = frozenset(tag for r in RULES for tag in r.tags)
    return wanted


class InstanceKeys(NamedTuple):
    """What the rules keep of one instance: where it goes and how it is addressed."""
    instance_number: int
    series_uid: str
    sop_instance_uid: str | None
    sop_class_uid: str | None
    number_of_frames: int | None
    rows: int
    columns: int
    transfer_syntax_uid: str | None = None  # set by header_scan.read_keys


def check_instance(raw, little, vrs=None, pixels=None):
    """Run every rule; return the instance's InstanceKeys. With ``vrs`` (the explicit
    VRs of the wanted tags) those are checked first (``check_vrs``); with ``pixels`` (the
    file's PixelData) its size is checked against the header last (``check_pixel_size``).

    Raises
    ------
    InvalidInstanceError
        With CIRCUS's messages: ``Could not find a encoding <x>``, ``Instance number not
        set``, ``Series UID of this DICOM file is invalid.``, then the checks of a new
        series document (study UID, Rows, Columns, Modality, sex), then the Image Pixel
        elements.
    BrokenDicomError
        When the pixel data does not have the size the header implies.
    """
    if vrs:
        check_vrs(vrs)
    kept = {r.name: r.check(raw, little) for r in RULES}
    image = kept["image_pixel"]
    if pixels is not None:
        check_pixel_size(pixels, image)
    frames = _ascii(raw(NUMBER_OF_FRAMES))  # checked by the image_pixel rule
    return InstanceKeys(kept["instance_number"], kept["series_uid"], kept["sop_instance_uid"],
                        kept["sop_class_uid"], int(frames) if frames else None, image.rows,
                        image.columns)


@rule("character_set", 0x00080005)
def _character_set(raw, _little):
    Decoder(raw(0x00080005))


@rule("instance_number", 0x00200013)
def _instance_number(raw, _little):
    match = INT_RE.match(_ascii(raw(0x00200013)) or "")
    if match is None:
        raise InvalidInstanceError("Instance number not set")
    number = int(match.group(0))
    if number < 0 or number > 99999999:
        raise InvalidInstanceError(f"Instance number {number} is out of range.")
    return number


@rule("series_uid", 0x0020000E)
def _series_uid(raw, _little):
    series_uid = _ascii(raw(0x0020000E)) or ""
    if not UID_RE.match(series_uid) or len(series_uid) > 64:
        raise InvalidInstanceError("Series UID of this DICOM file is invalid.")
    return series_uid


@rule("study_uid", 0x0020000D)
def _study_uid(raw, _little):
    study_uid = _ascii(raw(0x0020000D)) or ""
    if not UID_RE.match(study_uid) or len(study_uid) > 64:
        raise InvalidInstanceError("Study UID of this DICOM file is invalid.")


@rule("size", 0x00280010, 0x00280011)
def _size(raw, little):
    if _uint16(raw(0x00280011), little) is None or _uint16(raw(0x00280010), little) is None:
        raise InvalidInstanceError("Rows or Columns of this DICOM file is not set.")


@rule("modality", 0x00080060)
def _modality(raw, _little):
    modality = _ascii(raw(0x00080060))
    if not modality:
        raise InvalidInstanceError("Modality of this DICOM file is not set.")
    if len(modality) > 10:
        raise InvalidInstanceError("Modality of this DICOM file is too long.")


@rule("sex", 0x00100040)
def _sex(raw, _little):
    sex = _ascii(raw(0x00100040))
    if sex and sex not in ("F", "M", "O"):
        raise InvalidInstanceError(f"Patient's Sex must be F, M or O, not {sex!r}.")


def _optional_uid(raw):
    """A UID kept for addressing the instance; None when absent or not a UID (CIRCUS
    never required it, so its absence refuses nothing)."""
    uid = _ascii(raw)
    return uid if uid and UID_RE.match(uid) and len(uid) <= 64 else None


@rule("sop_instance_uid", 0x00080018)
def _sop_instance_uid(raw, _little):
    return _optional_uid(raw(0x00080018))


@rule("sop_class_uid", 0x00080016)
def _sop_class_uid(raw, _little):
    return _optional_uid(raw(0x00080016))


@rule("image_pixel", SAMPLES_PER_PIXEL, PHOTOMETRIC, PLANAR_CONFIGURATION, NUMBER_OF_FRAMES,
      ROWS, COLUMNS, BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION)
def _image_pixel(raw, little):
    """The Image Pixel elements the volume loader and standard readers rely on; keeps the
    number of pixel data bytes they imply (``check_pixel_size``)."""
    rows, columns = _us(raw, ROWS, little), _us(raw, COLUMNS, little)
    if rows < 1 or columns < 1:
        raise InvalidInstanceError("Rows and Columns of this DICOM file must be at least 1.")
    samples = _us(raw, SAMPLES_PER_PIXEL, little)
    if samples not in (1, 3, 4):
        raise InvalidInstanceError(f"Samples per Pixel must be 1, 3 or 4, not {samples}.")
    allocated = _us(raw, BITS_ALLOCATED, little)
    if allocated != 1 and (allocated % 8 or not 8 <= allocated <= 64):
        raise InvalidInstanceError(f"Bits Allocated must be 1 or a multiple of 8 up to 64, "
                                   f"not {allocated}.")
    stored = _us(raw, BITS_STORED, little)
    high = _us(raw, HIGH_BIT, little, required=False)
    if not 1 <= stored <= allocated or (high is not None and high >= allocated):
        raise InvalidInstanceError(f"Bits Stored ({stored}) or High Bit ({high}) does not "
                                   f"fit Bits Allocated ({allocated}).")
    if _us(raw, PIXEL_REPRESENTATION, little) not in (0, 1):
        raise InvalidInstanceError("Pixel Representation must be 0 or 1.")
    photometric = _ascii(raw(PHOTOMETRIC))
    if photometric not in PHOTOMETRICS:
        raise InvalidInstanceError(f"Photometric Interpretation {photometric!r} is not "
                                   "one a DICOM reader knows.")
    if samples > 1 and _us(raw, PLANAR_CONFIGURATION, little) not in (0, 1):
        raise InvalidInstanceError("Planar Configuration must be 0 or 1.")
    # Native YBR_FULL_422 keeps two samples per pixel (4:2:2), as readers expect.
    stored_samples = 2 if photometric == "YBR_FULL_422" and samples == 3 else samples
    return ImagePixel(rows, columns, samples,
                      -(-rows * columns * stored_samples * allocated * _frames(raw) // 8))


# --- the record -------------------------------------------------------------------------

class InstanceRecord:
    """What the importer extracts from one instance: its number, its series UID and its
    series' record (Series column values, patient_info included).

    ``series`` may be given as a loader: it is then read on first use (an import reads the
    whole header only for the first instance of a new series).
    """

    __slots__ = ("instance_number", "series_uid", "_series", "_load")

    def __init__(self, instance_number, series_uid, series=None, load=None):
        self.instance_number = instance_number
        self.series_uid = series_uid
        self._series = series
        self._load = load

    @property
    def series(self):
        if self._series is None:
            self._series = self._load()
        return self._series


def syntax_of(dataset):
    """(transfer syntax UID text, little endian?) of a parsed file."""
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    return syntax, UID(syntax).is_little_endian if UID(syntax).is_transfer_syntax else True


def extract_record(dataset, default_offset=0):
    """Build the instance record of 3.2.1 from a parsed header.

    Raises
    ------
    InvalidInstanceError
        As ``check_instance``.
    """
    _syntax, little = syntax_of(dataset)
    keys = check_instance(lambda tag: raw_bytes(dataset, tag), little)
    number, series_uid = keys.instance_number, keys.series_uid
    decoder = Decoder(raw_bytes(dataset, 0x00080005))
    offset = utc_offset_minutes(dataset, default_offset)
    study_local = local_datetime(_ascii(raw_bytes(dataset, 0x00080020)),
                                 _ascii(raw_bytes(dataset, 0x00080030)))
    series_local = local_datetime(_ascii(raw_bytes(dataset, 0x00080021)),
                                  _ascii(raw_bytes(dataset, 0x00080031)))
    chosen = series_local or study_local
    series = {
        "series_uid": series_uid, "study_uid": _ascii(raw_bytes(dataset, 0x0020000D)),
        "width": _uint16(raw_bytes(dataset, 0x00280011), little),
        "height": _uint16(raw_bytes(dataset, 0x00280010), little),
        "series_date": chosen - timedelta(minutes=offset) if chosen else None,
        "modality": _ascii(raw_bytes(dataset, 0x00080060)),
        "series_description": decoder.text(raw_bytes(dataset, 0x0008103E)) or "",
        "body_part": decoder.text(raw_bytes(dataset, 0x00180015)) or "",
        "station_name": decoder.text(raw_bytes(dataset, 0x00081010)) or "",
        "model_name": decoder.text(raw_bytes(dataset, 0x00081090)) or "",
        "manufacturer": decoder.text(raw_bytes(dataset, 0x00080070)) or "",
        "patient_info": _patient_info(dataset, decoder, study_local or series_local),
        "parameters": extract_parameters(dataset, decoder),
        **_study_attributes(dataset, decoder),
    }
    return InstanceRecord(number, series_uid, series)


def _study_attributes(dataset, decoder):
    """The study-level columns (and the series number) DICOM queries match on, as the
    header has them: dates and times as DICOM text, names decoded."""
    def text(tag, size=None):
        value = decoder.text(raw_bytes(dataset, tag))
        return value[:size] if value and size else value or None
    number = INT_RE.match(_ascii(raw_bytes(dataset, 0x00200011)) or "")
    return {"study_date": (_ascii(raw_bytes(dataset, 0x00080020)) or "")[:8] or None,
            "study_time": (_ascii(raw_bytes(dataset, 0x00080030)) or "")[:16] or None,
            "accession_number": text(0x00080050, 64), "study_description": text(0x00081030),
            "study_id": text(0x00200010, 16), "referring_physician_name": text(0x00080090),
            "series_number": int(number.group(0)) if number and
            abs(int(number.group(0))) < 2 ** 31 else None}


STUDY_COLUMNS = ("study_date", "study_time", "accession_number", "study_description",
                 "study_id", "referring_physician_name", "series_number")


def record_json(record):
    """An instance record as JSON, in the series document's field names (dump-dicom)."""
    s = record.series
    return {"seriesUid": s["series_uid"], "studyUid": s["study_uid"],
            "instanceNumber": record.instance_number, "width": s["width"],
            "height": s["height"], "seriesDate": iso(s["series_date"]),
            "modality": s["modality"], "seriesDescription": s["series_description"],
            "bodyPart": s["body_part"], "stationName": s["station_name"],
            "modelName": s["model_name"], "manufacturer": s["manufacturer"],
            "patientInfo": s["patient_info"], "parameters": s["parameters"]}


def default_offset():
    return int(current_app.config.get("DICOM_DEFAULT_UTC_OFFSET", 0))


def read_record(path, utc_offset=None):
    """Parse one DICOM file and extract its record (dump-dicom, refresh, new series)."""
    with open(path, "rb") as fh:
        dataset = read_dataset(fh, os.fstat(fh.fileno()).st_size)
    return extract_record(dataset, default_offset() if utc_offset is None else utc_offset)
