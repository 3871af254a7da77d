"""DICOM import: header parsing, the series record, archives, and the import of a batch.

One DICOM instance becomes a file ``dicom/<seriesUid>/<8-digit instance>.dcm`` and a merge
into its series row (API.md 3.2.1). Instances are imported in *batches* (all plain files of
a chunk, or one whole archive) so that the durability work is paid once per batch:

1. each instance is checked (dicom_header's walk over its header, or pydicom's parse for
   an unusual file; no pixel codecs needed) and written to a staging folder on the DICOM
   root's file system; only the first instance of a *new* series is parsed whole, at
   commit, for the series record;
2. a large batch makes its staged files durable with one ``syncfs`` before it takes
   any lock (a small batch only syncs, before their rename, the files that replace
   instances the database already knows);
3. one transaction locks the affected series rows, refuses series of another domain,
   renames the staged files into place, makes the renames (and a small batch's new
   files) durable with one ``syncfs`` (or fsync of each file and folder where ``syncfs``
   is unavailable), merges the ``images`` strings and commits; if anything fails, files
   that were new are removed again.

So a row never points at a missing or half-written file and a failed batch leaves
nothing behind (quirk 33 fixed). Archives (zip, tar.gz) are untrusted: entries with
``..``, absolute names or links are skipped, and their size and entry count are bounded.
"""
import ctypes
import functools
import io
import logging
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pydicom
import sqlalchemy as sa
from flask import current_app
from pydicom import charset as dicom_charset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID

import dicom_header
import storage
import tasks
from models import Series, db, new_ulid, utcnow
from series_access import images_string, merge_images, parse_ranges

log = logging.getLogger(__name__)

DICM_OFFSET = 128
SMALL_ENTRY_BYTES = 16 * 1024 * 1024  # entries up to this size are parsed from memory
BATCH_MAX_FILES = 2000  # plain files per batch (archives are one batch each)
BATCH_MAX_BYTES = 1024 ** 3
COPY_CHUNK = 1024 * 1024
SYNC_BEFORE_LOCK_MIN = 17  # batches from this many files sync their data before locking
IN_CHUNK = 500  # bound of SQL IN lists
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
TZ_RE = re.compile(r"^([+-])(\d\d)(\d\d)$")
AGE_RE = re.compile(r"^(\d{3})([DWMY])$")
INT_RE = re.compile(r"^[+-]?\d+")
FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
PARAMETER_GROUPS = (0x0018, 0x0020, 0x0028)
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}
PN_DELIMITERS = {0x5E, 0x3D}
NUMERIC_VRS = {"FL": ("f", 4), "FD": ("d", 8), "UL": ("L", 4), "SL": ("l", 4),
               "US": ("H", 2), "SS": ("h", 2)}


# --- errors -----------------------------------------------------------------------------

class DicomImportError(Exception):
    """Raised when an instance, an archive or a batch cannot be imported (user-facing)."""
    status = 400


class NotDicomError(DicomImportError):
    """Raised when a file does not look like DICOM (no ``DICM`` at byte 128)."""


class BrokenDicomError(DicomImportError):
    """Raised when a DICOM file cannot be parsed or is truncated."""


class InvalidInstanceError(DicomImportError):
    """Raised when a parsed instance lacks what a series record needs (3.2.1)."""


class DomainConflictError(DicomImportError):
    """Raised when instances of an existing series are imported into another domain."""
    status = 409


class ArchiveError(DicomImportError):
    """Raised when an archive cannot be read."""


class ArchiveLimitError(ArchiveError):
    """Raised when an archive exceeds the configured entry count or uncompressed size."""


class ImportFailed(DicomImportError):
    """Raised by an Importer with CIRCUS's "Error while processing file #f, entity #e"."""


# --- sniffing ---------------------------------------------------------------------------

def is_like_dicom(head):
    """Whether the first bytes of a file carry the ``DICM`` prefix at offset 128."""
    return len(head) >= DICM_OFFSET + 4 and head[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def is_zip(head):
    return head[:4] in (b"PK\x03\x04", b"PK\x07\x08")


def is_targz(head):
    return head[:2] == b"\x1f\x8b"


def file_kind(path):
    """``"dicom"``, ``"zip"``, ``"targz"`` or ``"other"``, from the first bytes of a file."""
    with open(path, "rb") as fh:
        head = fh.read(DICM_OFFSET + 4)
    if is_like_dicom(head):
        return "dicom"
    if is_zip(head):
        return "zip"
    if is_targz(head):
        return "targz"
    return "other"


# --- header reading ---------------------------------------------------------------------

def read_dataset(fh, size):
    """Parse a DICOM file's header (no pixel data) from a seekable binary file.

    Also checks that the pixel data is present and complete, so a truncated file is
    refused even though its header parses.

    Raises
    ------
    NotDicomError, BrokenDicomError
    """
    start = fh.tell()
    if not is_like_dicom(fh.read(DICM_OFFSET + 4)):
        raise NotDicomError("The file is not a DICOM file.")
    fh.seek(start)
    try:
        dataset = pydicom.dcmread(fh, stop_before_pixels=True)
        syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 "))
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            fh.seek(start)
            full = pydicom.dcmread(fh)
            if not any(tag in full for tag in PIXEL_TAGS):
                raise BrokenDicomError("The DICOM file has no pixel data or is truncated.")
        else:
            _check_pixel_data(fh, start + size, syntax)
    except DicomImportError:
        raise
    except Exception as exc:  # pydicom's many ways of failing on untrusted bytes
        raise BrokenDicomError(f"The DICOM file cannot be parsed ({type(exc).__name__}).") from None
    return dataset


def _check_pixel_data(fh, end, syntax):
    """Refuse a file whose pixel data element is missing or shorter than declared."""
    position = fh.tell()
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    header = fh.read(12)
    truncated = BrokenDicomError("The DICOM file has no pixel data or is truncated.")
    if len(header) < 8:
        raise truncated
    group, element = struct.unpack("<HH" if little else ">HH", header[:4])
    if (group << 16 | element) not in PIXEL_TAGS:
        raise truncated
    if implicit:
        length, header_size = struct.unpack("<L" if little else ">L", header[4:8])[0], 8
    else:
        if len(header) < 12:
            raise truncated
        length, header_size = struct.unpack("<L" if little else ">L", header[8:12])[0], 12
    if length != 0xFFFFFFFF:
        if position + header_size + length > end:
            raise truncated
        return
    # Encapsulated pixel data ends with a sequence delimiter (maybe followed by padding).
    tail_size = min(end - position, 1024 * 1024)
    fh.seek(end - tail_size)
    tail = fh.read(tail_size)
    if SEQUENCE_DELIMITER_LE not in tail and SEQUENCE_DELIMITER_BE not in tail:
        raise truncated


# --- value decoding ---------------------------------------------------------------------

def _element(dataset, tag):
    try:
        return dataset.get_item(tag)
    except (KeyError, ValueError):
        return None


def _raw_bytes(dataset, tag):
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
    text = _ascii(_raw_bytes(dataset, tag))
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
        return _ascii(_raw_bytes(dataset, elem.tag))
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
    decoder = decoder or Decoder(_raw_bytes(dataset, 0x00080005))
    syntax = str(dataset.file_meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
    little = UID(syntax).is_little_endian if UID(syntax).is_transfer_syntax else True
    params = {"TransferSyntaxUID": syntax or None,
              "pixelSpacingX": _nth_float(dataset, 0x00280030, 0),
              "pixelSpacingY": _nth_float(dataset, 0x00280030, 1),
              "imagePositionPatientZ": _nth_float(dataset, 0x00200032, 2),
              "PixelValueUnits": _ascii(_raw_bytes(dataset, 0x00541001))}
    pixel_representation = None
    raw_pr = _raw_bytes(dataset, 0x00280103)
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
    match = TZ_RE.match(_ascii(_raw_bytes(dataset, 0x00080201)) or "")
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
    raw_name = _raw_bytes(dataset, 0x00100010)
    birth = _ascii(_raw_bytes(dataset, 0x00100030))
    sex = _ascii(_raw_bytes(dataset, 0x00100040))
    info = {
        "patientId": decoder.text(_raw_bytes(dataset, 0x00100020)),
        # Not trimmed (quirk 34, compat): the padding space stays, as in existing data.
        "patientName": decoder.text(raw_name, trim=False) if raw_name else None,
        "age": _age(_ascii(_raw_bytes(dataset, 0x00101010)), birth, reference),
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


def check_instance(raw, little):
    """Check what every instance needs and return ``(instance number, series UID)``.

    ``raw(tag)`` gives the undecoded bytes of a top-level element (or None).

    Raises
    ------
    InvalidInstanceError
        With CIRCUS's messages: ``Could not find a encoding <x>``, ``Instance number not
        set``, ``Series UID of this DICOM file is invalid.``, then the checks of a new
        series document (study UID, Rows, Columns, Modality, sex).
    """
    Decoder(raw(0x00080005))
    number_text = _ascii(raw(0x00200013)) or ""
    match = INT_RE.match(number_text)
    if match is None:
        raise InvalidInstanceError("Instance number not set")
    number = int(match.group(0))
    if number < 0 or number > 99999999:
        raise InvalidInstanceError(f"Instance number {number} is out of range.")
    series_uid = _ascii(raw(0x0020000E)) or ""
    if not UID_RE.match(series_uid) or len(series_uid) > 64:
        raise InvalidInstanceError("Series UID of this DICOM file is invalid.")
    study_uid = _ascii(raw(0x0020000D)) or ""
    if not UID_RE.match(study_uid) or len(study_uid) > 64:
        raise InvalidInstanceError("Study UID of this DICOM file is invalid.")
    if _uint16(raw(0x00280011), little) is None or _uint16(raw(0x00280010), little) is None:
        raise InvalidInstanceError("Rows or Columns of this DICOM file is not set.")
    modality = _ascii(raw(0x00080060))
    if not modality:
        raise InvalidInstanceError("Modality of this DICOM file is not set.")
    if len(modality) > 10:
        raise InvalidInstanceError("Modality of this DICOM file is too long.")
    sex = _ascii(raw(0x00100040))
    if sex and sex not in ("F", "M", "O"):
        raise InvalidInstanceError(f"Patient's Sex must be F, M or O, not {sex!r}.")
    return number, series_uid


def _syntax_of(dataset):
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
    _syntax, little = _syntax_of(dataset)
    number, series_uid = check_instance(lambda tag: _raw_bytes(dataset, tag), little)
    decoder = Decoder(_raw_bytes(dataset, 0x00080005))
    offset = utc_offset_minutes(dataset, default_offset)
    study_local = local_datetime(_ascii(_raw_bytes(dataset, 0x00080020)),
                                 _ascii(_raw_bytes(dataset, 0x00080030)))
    series_local = local_datetime(_ascii(_raw_bytes(dataset, 0x00080021)),
                                  _ascii(_raw_bytes(dataset, 0x00080031)))
    chosen = series_local or study_local
    series = {
        "series_uid": series_uid, "study_uid": _ascii(_raw_bytes(dataset, 0x0020000D)),
        "width": _uint16(_raw_bytes(dataset, 0x00280011), little),
        "height": _uint16(_raw_bytes(dataset, 0x00280010), little),
        "series_date": chosen - timedelta(minutes=offset) if chosen else None,
        "modality": _ascii(_raw_bytes(dataset, 0x00080060)),
        "series_description": decoder.text(_raw_bytes(dataset, 0x0008103E)) or "",
        "body_part": decoder.text(_raw_bytes(dataset, 0x00180015)) or "",
        "station_name": decoder.text(_raw_bytes(dataset, 0x00081010)) or "",
        "model_name": decoder.text(_raw_bytes(dataset, 0x00081090)) or "",
        "manufacturer": decoder.text(_raw_bytes(dataset, 0x00080070)) or "",
        "patient_info": _patient_info(dataset, decoder, study_local or series_local),
        "parameters": extract_parameters(dataset, decoder),
    }
    return InstanceRecord(number, series_uid, series)


def record_json(record):
    """An instance record as JSON, in the series document's field names (dump-dicom)."""
    from models import iso
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


@functools.lru_cache(maxsize=64)
def _uid(text):
    """pydicom's UID of a transfer syntax (validated once per distinct value)."""
    return UID(text)


def read_keys(fh, size):
    """Check one instance and return ``(instance number, series UID)``, reading only what
    that needs: dicom_header's walk, or pydicom's parse (read_dataset, with its errors)
    whenever the walk leaves the file to it or its pixel data check fails.

    Raises
    ------
    NotDicomError, BrokenDicomError, InvalidInstanceError
    """
    start = fh.tell()
    header = dicom_header.scan(fh, size)
    if header is not None:
        fh.seek(start + header.pixel_offset)
        try:
            _check_pixel_data(fh, start + size, _uid(header.syntax))
        except BrokenDicomError:
            pass  # pydicom's path below gives the verdict
        else:
            return check_instance(header.raw, header.little)
    fh.seek(start)
    dataset = read_dataset(fh, size)
    return check_instance(lambda tag: _raw_bytes(dataset, tag), _syntax_of(dataset)[1])


# --- durability -------------------------------------------------------------------------

def _syncfs_function():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


_SYNCFS = _syncfs_function()


def _syncfs(folder):
    """One syncfs of the file system holding ``folder``; False where it is unavailable or
    fails (the caller then fsyncs each file, which reports the error)."""
    if _SYNCFS is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(folder, paths):
    """Flush the files of a batch to disk: one syncfs of the file system of ``folder``, or
    one fsync per file where syncfs is unavailable."""
    if not _syncfs(folder):
        for path in paths:
            _fsync(path)


_SYNC_POOL = []  # the fsync threads of early syncs, started on first use
# A forked child has none of its parent's threads: it starts a pool of its own.
os.register_at_fork(after_in_child=_SYNC_POOL.clear)


class EarlySync:
    """The fsync of one staged file, started on a thread as soon as the file is complete.

    ``os.fsync`` releases the GIL, so the flush to disk overlaps the header check and the
    database work of the same request (``/single``) instead of following them. The file
    is opened here, so the fsync reaches it even after it is renamed into place.
    """

    def __init__(self, path):
        if not _SYNC_POOL:
            _SYNC_POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync"))
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.future = _SYNC_POOL[0].submit(os.fsync, self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def wait(self):
        """Block until the data is on disk (raising the fsync's error); closes the file."""
        if self.fd is None:
            return
        try:
            self.future.result()
        finally:
            os.close(self.fd)
            self.fd = None


def make_placed_durable(files, folders, root_changed):
    """After renames into ``folders``: make the renames and the not yet synced ``files``
    durable, with one syncfs (data and metadata of the whole file system), else with an
    fsync of each file, each folder and, when a folder was created, the DICOM root.
    A few files in a few folders (``/single``, small uploads) take those fsyncs only: a
    syncfs would also wait for everyone else's writes (an export, another upload)."""
    targeted = len(files) < SYNC_BEFORE_LOCK_MIN and len(folders) < SYNC_BEFORE_LOCK_MIN
    if folders and not targeted and _syncfs(next(iter(folders))):
        return
    for path in files:
        _fsync(path)
    for folder in folders:
        storage.fsync_dir(folder)
    if root_changed:
        storage.fsync_dir(storage.root("dicom"))


# --- a batch ----------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What a committed batch did."""
    instances: int = 0
    series_uids: set = field(default_factory=set)
    new_instances: int = 0


class ImportBatch:
    """Instances staged for one all-or-nothing import into ``domain``.

    Use as a context manager: the staging folder is removed on exit, committed or not.
    """

    def __init__(self, domain, utc_offset=None):
        self.domain = domain
        self.utc_offset = default_offset() if utc_offset is None else utc_offset
        # One shared staging folder; this batch's files carry its own prefix.
        self.dir = storage.dicom_staging_dir("batches")
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        self.prefix = new_ulid()
        self.staged = {}  # (seriesUid, instance) -> staged path; the last copy wins
        # seriesUid -> key of its first instance, whose whole header is parsed at commit
        # if the series is new (so a batch stays small in memory and an instance of a
        # known series is never parsed by pydicom).
        self.first_key = {}
        self.bytes = 0
        self._counter = 0
        self.syncing = {}  # staged path -> EarlySync (add_staged with sync_now)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.discard()

    def __len__(self):
        return len(self.staged)

    def _staged_name(self):
        self._counter += 1
        return os.path.join(self.dir, f"{self.prefix}-{self._counter:08d}")

    def _keep(self, keys, path, size):
        number, uid = keys
        key = (uid, number)
        previous = self.staged.get(key)
        if previous is not None:
            self._forget_sync(previous)
            os.unlink(previous)
        self.staged[key] = path
        self.first_key.setdefault(uid, key)
        self.bytes += size
        offset = self.utc_offset
        return InstanceRecord(number, uid, load=lambda: read_record(path, offset).series)

    def add_bytes(self, data, move_from=None):
        """Stage one instance given as bytes; return its InstanceRecord.

        ``move_from`` names a file holding the same bytes that may be taken over (a spool
        file): it is renamed into the staging folder instead of writing a copy.
        """
        keys = read_keys(io.BytesIO(data), len(data))
        path = self._staged_name()
        try:
            if move_from is None:
                raise OSError("nothing to move")
            os.replace(move_from, path)
        except OSError:
            with open(path, "wb") as fh:
                fh.write(data)
        return self._keep(keys, path, len(data))

    def add_stream(self, stream, size):
        """Stage one instance read from a stream of known size (an archive entry)."""
        if size <= SMALL_ENTRY_BYTES:
            data = _read_exactly(stream, size)
            return self.add_bytes(data)
        path = self._staged_name()
        try:
            with open(path, "wb") as out:
                copied = _copy_bounded(stream, out, size)
            if copied != size:
                raise BrokenDicomError("The archive entry is shorter than declared.")
            return self.add_staged(path)
        except BaseException:
            _unlink_quietly(path)
            raise

    def add_file(self, path, move=False):
        """Stage one instance from a file; ``move`` takes the file over (spool files)."""
        size = os.path.getsize(path)
        if not move and size <= SMALL_ENTRY_BYTES:
            with open(path, "rb") as fh:
                return self.add_bytes(fh.read())
        staged = self._staged_name()
        if move:
            try:
                os.replace(path, staged)
            except OSError:  # another file system: copy instead
                shutil.copyfile(path, staged)
        else:
            shutil.copyfile(path, staged)
        try:
            return self.add_staged(staged)
        except BaseException:
            _unlink_quietly(staged)
            raise

    def add_staged(self, staged, sync_now=False):
        """Stage a file already in the staging folder (named by ``_staged_name`` or with
        this batch's prefix). ``sync_now`` starts its fsync at once (EarlySync): for a
        batch of one file, whose commit would otherwise wait for it."""
        if sync_now:
            self.syncing[staged] = EarlySync(staged)
        try:
            with open(staged, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                keys = read_keys(fh, size)
        except BaseException:
            self._forget_sync(staged)
            raise
        return self._keep(keys, staged, size)

    def _forget_sync(self, staged):
        """Wait for the early sync of ``staged`` (if any) and drop it, ignoring its error
        (the file is being discarded)."""
        early = self.syncing.pop(staged, None)
        if early is not None:
            try:
                early.wait()
            except OSError:
                pass

    def discard(self):
        """Remove whatever this batch still has in the staging folder."""
        for staged in list(self.syncing):
            self._forget_sync(staged)
        for name in os.listdir(self.dir):
            if name.startswith(self.prefix):
                _unlink_quietly(os.path.join(self.dir, name))
        self.staged = {}
        self.first_key = {}

    def commit(self):
        """Make the staged files durable, move them into place and upsert the series rows
        in one transaction; on failure nothing of the batch remains. Return a BatchResult.

        Raises
        ------
        DomainConflictError
            When a series of the batch already exists in another domain.
        """
        if not self.staged:
            return BatchResult()
        # A large batch flushes its data before it locks anything (the flush takes long);
        # a small one leaves it to the single sync after its renames.
        synced = len(self.staged) >= SYNC_BEFORE_LOCK_MIN
        if synced:
            make_durable(self.dir, list(self.staged.values()))
        by_series = {}
        for (uid, number) in self.staged:
            by_series.setdefault(uid, []).append(number)
        placed = []
        try:
            new_files = self._upsert(by_series, placed, synced)
        except BaseException:
            db.session.rollback()
            self._remove_new(placed)
            raise
        log.info("Imported %d instances into %d series (%s)", len(self.staged),
                 len(by_series), self.domain)
        self.staged = {}
        self.first_key = {}
        return BatchResult(instances=sum(len(v) for v in by_series.values()),
                           series_uids=set(by_series), new_instances=len(new_files))

    def _lock_rows(self, uids):
        """``{uid: (domain, images)}`` of the existing series of ``uids``, their rows locked
        until the transaction ends."""
        if db.engine.dialect.update_returning:
            # One statement: a no-op UPDATE takes the locks (SQLite's database lock, row
            # locks elsewhere) and RETURNING reads the two columns the merge needs.
            # Core statements run on the session's connection: the ORM adds nothing here.
            return {uid: (domain, images) for uid, domain, images in
                    db.session.connection().execute(_LOCK_SERIES, {"uids": list(uids)})}
        found = {}
        if db.engine.dialect.name == "sqlite":
            # A write first takes SQLite's database lock, so the rows read next cannot
            # change before this transaction commits.
            for chunk in _chunks(uids):
                db.session.execute(sa.update(Series).where(Series.series_uid.in_(chunk))
                                   .values(images=Series.images, updated_at=Series.updated_at)
                                   .execution_options(synchronize_session=False))
        for chunk in _chunks(uids):
            query = db.select(Series).where(Series.series_uid.in_(chunk))
            if db.engine.dialect.name != "sqlite":
                query = query.with_for_update()
            for series in db.session.execute(query).scalars():
                found[series.series_uid] = (series.domain, series.images)
        return found

    def _series_values(self, uid):
        """The series record of a new series, from the whole header of its first staged
        instance."""
        record = read_record(self.staged[self.first_key[uid]], self.utc_offset)
        if record.series_uid != uid:  # the walk and pydicom disagree: trust neither
            raise BrokenDicomError("The DICOM file cannot be parsed consistently.")
        return dict(record.series)

    def _upsert(self, by_series, placed, synced):
        new_keys = set()
        now = utcnow()
        for chunk in _chunks(sorted(by_series)):
            existing = self._lock_rows(chunk)
            touched = []
            updates = []
            for uid in chunk:
                numbers = by_series[uid]
                row = existing.get(uid)
                if row is None:
                    values = self._series_values(uid)
                    patient_info = values.pop("patient_info")
                    series = Series(**values, images=images_string(numbers), domain=self.domain,
                                    storage_id=0, created_at=now, updated_at=now)
                    series.set_patient_info(patient_info)
                    db.session.add(series)
                    new_keys.update((uid, n) for n in numbers)
                    touched.append(series)
                    continue
                domain, images = row
                if domain != self.domain:
                    raise DomainConflictError(
                        f"The series {uid} already exists in another domain; its instances "
                        f"cannot be imported into the domain \"{self.domain}\".")
                ranges = parse_ranges(images)
                new_keys.update((uid, n) for n in numbers
                                if not any(a <= n <= b for a, b in ranges))
                updates.append({"uid": uid, "images": merge_images(images, numbers),
                                "now": now})
            if updates:
                db.session.connection().execute(_UPDATE_IMAGES, updates)
            if touched:
                db.session.flush()
            for series in touched:  # written; no need to keep them in memory
                db.session.expunge(series)
        folders = set()
        created = False
        unsynced = []
        for (uid, number), staged in sorted(self.staged.items()):
            target = storage.instance_path(uid, number)
            folder = os.path.dirname(target)
            if folder not in folders:
                if not os.path.isdir(folder):
                    os.makedirs(folder, exist_ok=True)
                    created = True
                folders.add(folder)
            is_new = (uid, number) in new_keys
            syncing = self.syncing.get(staged)
            if syncing is not None:
                if not is_new:
                    syncing.wait()  # it replaces a file a row points at
            elif not synced:
                if not is_new:
                    # It replaces a file a row points at: its data must be durable first.
                    _fsync(staged)
                else:
                    unsynced.append(target)
            os.replace(staged, target)
            placed.append((target, is_new))
        # Before the commit: no row ever points at a file that is not durable.
        make_placed_durable(unsynced, folders, created)
        for syncing in self.syncing.values():
            syncing.wait()  # on failure, discard() waits for the others
        self.syncing = {}
        db.session.commit()
        return new_keys

    @staticmethod
    def _remove_new(placed):
        """Undo the renames of instances the database does not know."""
        for target, is_new in placed:
            if is_new:
                _unlink_quietly(target)


_SERIES = Series.__table__
_LOCK_SERIES = (_SERIES.update().where(_SERIES.c.series_uid.in_(sa.bindparam("uids", expanding=True)))
                .values(images=_SERIES.c.images, updated_at=_SERIES.c.updated_at)
                .returning(_SERIES.c.series_uid, _SERIES.c.domain, _SERIES.c.images))
_UPDATE_IMAGES = (_SERIES.update().where(_SERIES.c.series_uid == sa.bindparam("uid"))
                  .values(images=sa.bindparam("images"), updated_at=sa.bindparam("now")))


def _chunks(items, size=IN_CHUNK):
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_exactly(stream, size):
    data = stream.read(size + 1)
    if len(data) > size:
        raise ArchiveLimitError("An archive entry is larger than declared.")
    if len(data) < size:
        raise BrokenDicomError("The archive entry is shorter than declared.")
    return data


def _copy_bounded(stream, out, size):
    copied = 0
    while True:
        chunk = stream.read(COPY_CHUNK)
        if not chunk:
            return copied
        copied += len(chunk)
        if copied > size:
            raise ArchiveLimitError("An archive entry is larger than declared.")
        out.write(chunk)


# --- archives ---------------------------------------------------------------------------

@dataclass
class Limits:
    """Bounds of one archive: total uncompressed bytes and number of entries."""
    max_bytes: int
    max_entries: int

    @classmethod
    def from_config(cls):
        config = current_app.config
        return cls(int(config["ARCHIVE_MAX_TOTAL_BYTES"]), int(config["ARCHIVE_MAX_ENTRIES"]))

    def check(self, entries, total):
        if entries > self.max_entries:
            raise ArchiveLimitError(
                f"The archive has more than {self.max_entries} entries.")
        if total > self.max_bytes:
            raise ArchiveLimitError(
                f"The archive is larger than {self.max_bytes} bytes uncompressed.")


def unsafe_name(name):
    """Whether an archive entry name is absolute or climbs out with ``..``."""
    normalized = name.replace("\\", "/")
    return (normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) is not None
            or ".." in normalized.split("/") or "\x00" in normalized)


@dataclass
class Entry:
    """A regular-file entry of an archive: its name, size and an opener of its bytes."""
    name: str
    size: int
    open: object


def zip_entries(path, limits, skipped):
    """The safe regular-file entries of a zip, after checking the declared sizes.

    ``skipped`` is a one-element list counting entries that are ignored.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"The zip archive cannot be read ({exc}).") from None
    with archive:
        infos = archive.infolist()
        # Declared sizes bound what zipfile will ever inflate, so this check comes first.
        limits.check(len(infos), sum(info.file_size for info in infos))
        for info in infos:
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if (unsafe_name(info.filename) or stat.S_ISLNK(mode) or info.flag_bits & 0x1):
                skipped[0] += 1
                continue
            yield Entry(info.filename, info.file_size, lambda info=info: archive.open(info))


def targz_entries(path, limits, skipped):
    """The safe regular-file entries of a gzip-compressed tar, streamed; sizes and counts
    are checked as the headers arrive (each header announces its entry's size)."""
    try:
        archive = tarfile.open(path, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"The tar.gz archive cannot be read ({exc}).") from None
    count = total = 0
    try:
        with archive:
            for member in archive:
                count += 1
                total += max(member.size, 0)
                limits.check(count, total)
                if not member.isfile() or unsafe_name(member.name):
                    if not member.isdir():
                        skipped[0] += 1
                    continue
                yield Entry(member.name, member.size,
                            lambda member=member: archive.extractfile(member))
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"The tar.gz archive cannot be read ({exc}).") from None


# --- an import run ----------------------------------------------------------------------

class Importer:
    """Imports files (plain DICOM, zip, tar.gz) into one domain, batch by batch.

    Counts follow CIRCUS's task messages: ``files`` uploaded files completely processed,
    ``entities`` DICOM instances imported. A failure raises ImportFailed with
    ``Error while processing file #<f>, entity #<e>: <reason>``; batches committed
    before it stay imported, the failing batch leaves nothing behind. With ``move_files``
    the files are the importer's to consume (an upload's spool): plain files are renamed
    into staging and an archive is removed once all its entries are staged.
    """

    def __init__(self, domain, on_entity=None, move_files=False):
        self.domain = domain
        self.on_entity = on_entity
        self.move_files = move_files
        self.offset = default_offset()
        self.limits = Limits.from_config()
        self.files = 0
        self.entities = 0  # committed
        self.pending_entities = 0  # staged in the open plain batch
        self.skipped = 0
        self.series_uids = set()
        self.plain = None

    def _fail(self, reason, entity):
        raise ImportFailed(f"Error while processing file #{self.files + 1}, "
                           f"entity #{entity}: {reason}")

    def _commit(self, batch):
        result = batch.commit()
        self.series_uids |= result.series_uids
        return result

    def _flush_plain(self):
        if self.plain is None:
            return
        try:
            self._commit(self.plain)
            self.entities += self.pending_entities
        finally:
            self.pending_entities = 0
            self.plain.discard()
            self.plain = None

    def _notify(self):
        if self.on_entity is not None:
            self.on_entity(self.entities + self.pending_entities)

    def import_file(self, path):
        """Import one file: a DICOM instance, a zip or a tar.gz; anything else is skipped."""
        with open(path, "rb") as fh:
            head = fh.read(DICM_OFFSET + 4)
            data = None
            if is_like_dicom(head) and os.fstat(fh.fileno()).st_size <= SMALL_ENTRY_BYTES:
                data = head + fh.read()  # one open per small file: opens are what cost most
        if is_like_dicom(head):
            self._import_plain(path, data)
        elif is_zip(head) or is_targz(head):
            self._flush_plain_or_fail()
            self._import_archive(path, "zip" if is_zip(head) else "targz")
        else:
            self.skipped += 1
        self.files += 1

    def _flush_plain_or_fail(self):
        try:
            self._flush_plain()
        except DicomImportError as exc:
            self._fail(f"{exc} None of the {self.pending_entities} DICOM files since the "
                       "last commit was imported.", self.entities + 1)

    def _import_plain(self, path, data=None):
        if self.plain is None:
            self.plain = ImportBatch(self.domain, self.offset)
        try:
            if data is not None:
                self.plain.add_bytes(data, move_from=path if self.move_files else None)
            else:
                self.plain.add_file(path, move=self.move_files)
        except DicomImportError as exc:
            entity = self.entities + self.pending_entities + 1
            # Instances before the broken one stay imported, as in CIRCUS.
            self._flush_plain_or_fail()
            self._fail(str(exc), entity)
        self.pending_entities += 1
        self._notify()
        if len(self.plain) >= BATCH_MAX_FILES or self.plain.bytes >= BATCH_MAX_BYTES:
            self._flush_plain_or_fail()

    def _import_archive(self, path, kind):
        skipped = [0]
        staged = 0
        entries = zip_entries if kind == "zip" else targz_entries
        with ImportBatch(self.domain, self.offset) as batch:
            try:
                for entry in entries(path, self.limits, skipped):
                    with entry.open() as stream:
                        head = stream.read(DICM_OFFSET + 4)
                        if not is_like_dicom(head):
                            skipped[0] += 1
                            continue
                        try:
                            batch.add_stream(_Prefixed(head, stream), entry.size)
                        except DicomImportError as exc:
                            raise DicomImportError(f"{exc} (entry {entry.name!r})") from None
                    staged += 1
                    if self.on_entity is not None:
                        self.on_entity(self.entities + staged)
                if self.move_files:
                    # A spooled upload is read (and closed) once every entry is staged;
                    # removed now, its dirty pages are dropped instead of being flushed
                    # to disk by the commit's sync (which would double the data written).
                    _unlink_quietly(path)
                self._commit(batch)
            except DicomImportError as exc:
                self._fail(f"{exc} Nothing of this archive was imported.",
                           self.entities + staged + 1)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError,
                    OSError, RuntimeError, NotImplementedError, zlib.error) as exc:
                self._fail(f"The archive cannot be read ({exc}). Nothing of this archive "
                           "was imported.", self.entities + staged + 1)
        self.entities += staged
        self.skipped += skipped[0]

    def finish(self):
        """Commit what is still staged; return (entities, files, skipped, series count)."""
        self._flush_plain_or_fail()
        return self.entities, self.files, self.skipped, len(self.series_uids)

    def close(self):
        """Drop anything staged but not committed."""
        if self.plain is not None:
            self.plain.discard()
            self.plain = None


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (the DICOM sniff) put back in front."""

    def __init__(self, head, stream):
        self.head = head
        self.stream = stream

    def readable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
            if len(data) < size:
                data += self.stream.read(size - len(data))
            return data
        return self.stream.read(size)


def import_single(path, domain, move=False):
    """Import exactly one DICOM file synchronously (``/single``); return its InstanceRecord."""
    with ImportBatch(domain) as batch:
        record = batch.add_file(path, move=move)
        batch.commit()
    return record


def collect_paths(paths, recursive):
    """Expand folders (recursively with ``recursive``) into a sorted list of file paths."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            if recursive:
                for folder, dirs, names in os.walk(path):
                    dirs.sort()
                    files.extend(os.path.join(folder, n) for n in sorted(names))
            else:
                files.extend(os.path.join(path, n) for n in sorted(os.listdir(path))
                             if os.path.isfile(os.path.join(path, n)))
        else:
            files.append(path)
    return [f for f in files if os.path.isfile(f) and not os.path.islink(f)]


# --- the task ---------------------------------------------------------------------------

TASK_NAME = "Series import"


def run_import_task(task, progress):
    """Worker: import the files spooled for an upload task (POST /series/domain/:domain)."""
    spool = storage.spool_dir(task.task_id)
    params = task.params or {}
    importer = Importer(params["domain"], move_files=True,
                        on_entity=lambda n: progress(f"Imported {n} entities..."))
    try:
        for name in params.get("files", []):
            importer.import_file(os.path.join(spool, name))
        entities, files, skipped, _series = importer.finish()
    except DicomImportError as exc:
        raise tasks.TaskError(str(exc)) from None
    finally:
        importer.close()
        storage.remove_tree(spool)
    message = f"Imported {entities} entities from {files} files."
    if skipped:
        message += f" {skipped} non-DICOM entries were skipped."
    return message


# --- maintenance ------------------------------------------------------------------------

def refresh_parameters(max_date=None, on_series=None):
    """Re-read ``parameters`` of stored series from their first image, keeping updatedAt.

    Returns (refreshed, failed) counts.
    """
    query = db.select(Series.series_uid, Series.images).order_by(Series.created_at)
    if max_date is not None:
        query = query.where(Series.created_at <= max_date)
    rows = db.session.execute(query).all()
    db.session.rollback()
    refreshed = failed = 0
    for uid, images in rows:
        ranges = parse_ranges(images)
        try:
            record = read_record(storage.instance_path(uid, ranges[0][0]))
        except (DicomImportError, OSError, IndexError) as exc:
            log.warning("Cannot refresh parameters of %s: %s", uid, exc)
            failed += 1
        else:
            db.session.execute(sa.update(Series).where(Series.series_uid == uid).values(
                parameters=record.series["parameters"], updated_at=Series.updated_at))
            db.session.commit()
            refreshed += 1
        if on_series is not None:
            on_series(uid)
    return refreshed, failed
