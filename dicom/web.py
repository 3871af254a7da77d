"""DICOMweb (PS3.18): QIDO-RS search, WADO-RS retrieve and STOW-RS store.

The same series, domains and tokens as ``/api``: searches and retrievals see only the
caller's domains (``query.find`` / ``query.instance_files``), patient attributes (group
0010) only when the route says so, and stored instances go through the one import path
(``batch.ImportBatch``). Answers are the standard's JSON model (``application/dicom+json``)
and ``multipart/related`` bodies streamed part by part, so memory stays bounded by one
instance whatever the size of a study.

Decisions the standard leaves to the server:

- Retrieve without ``transfer-syntax`` gives Explicit VR Little Endian (compressed pixel
  data decoded, implicit or big-endian files re-encoded); ``transfer-syntax=*`` gives each
  file as stored. Other syntaxes are not produced (406).
- Frames are always uncompressed (``application/octet-stream``, Explicit VR Little Endian).
- Rendered images and thumbnails are PNG only (no JPEG encoder is shipped): ``image/jpeg``
  alone is answered 406, and ``*/*`` or ``image/*`` get PNG.
- A search returns at most MAX_RESULTS matches (``limit`` or not); a ``Warning`` header
  says when more exist, and lists the query keys that were not matched on.
"""
import functools
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import orjson
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.uid import UID
from werkzeug.http import parse_list_header, parse_options_header

import multipart_spool
from dicom import batch as batch_module
from dicom import query, volumes
from dicom.batch import ImportBatch, unlink_quietly
from dicom.elements import DICM_OFFSET, is_dicm
from dicom.errors import BrokenDicomError, DicomImportError, NotDicomError
from dicom.header_scan import scan
from dicom.reformat import apply_window, encode_png
from models import ServerParam, db

log = logging.getLogger(__name__)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
NATIVE_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)
MAX_RESULTS = 1000  # matches of a search at most, whatever its ``limit``
METADATA_MEMO_SIZE = 2048  # encoded instance metadata kept per process (~5-20 KB each)
READ_CHUNK = 1024 * 1024
THUMBNAIL_SIZE = 128
INLINE_BINARY_MAX = 1024  # larger binary values are left out of metadata
PATIENT_GROUP = 0x0010
# STOW-RS failure reasons (PS3.18 Table 10.5.3-1 / PS3.4 Annex B)
PROCESSING_FAILURE = 0x0110
STUDY_MISMATCH = 0xC409
CANNOT_UNDERSTAND = 0xC000

LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
STUDY_ATTRIBUTES = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                    "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID",
                    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_ATTRIBUTES = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                     "SeriesDate", "NumberOfSeriesRelatedInstances")
INSTANCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")
# What includefield=all adds at each level: every attribute query.find knows there.
ALL_ATTRIBUTES = {"STUDY": STUDY_ATTRIBUTES + ("NumberOfPatientRelatedStudies",),
                  "SERIES": STUDY_ATTRIBUTES + SERIES_ATTRIBUTES,
                  "IMAGE": STUDY_ATTRIBUTES + SERIES_ATTRIBUTES + INSTANCE_ATTRIBUTES}
PATIENT_KEYS = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "PatientAge", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"}
_HEADER_UNSAFE = re.compile(r'[^\x20-\x7e]|"')
# Query parameters of PS3.18 that are not attribute keys.
CONTROL_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


class DicomWebError(Exception):
    """Raised for a request DICOMweb answers with an error status; the message is shown."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def _not_found():
    # The same answer whether the resource is elsewhere or nowhere: no hint it exists.
    return DicomWebError(404, "The requested resource was not found.")


# --- content negotiation ----------------------------------------------------------------

def _accepted(accept):
    """``[(media type, parameters)]`` of an Accept header; ``*/*`` when it is absent."""
    if not accept or not accept.strip():
        return [("*/*", {})]
    items = []
    for item in parse_list_header(accept):
        media_type, params = parse_options_header(item)
        if media_type and params.get("q") not in ("0", "0.0", "0.00", "0.000"):
            items.append((media_type.lower(), {k.lower(): v for k, v in params.items()}))
    return items


def _matches(media_type, wanted):
    if media_type in ("*/*", wanted):
        return True
    return media_type.endswith("/*") and wanted.startswith(media_type[:-1])


def negotiate_multipart(accept, part_type):
    """The transfer syntax to send ``part_type`` parts in: ``"*"`` (as stored) or
    EXPLICIT_LE, for an Accept header; DicomWebError 406 when nothing acceptable."""
    for media_type, params in _accepted(accept):
        if media_type == "*/*":
            return EXPLICIT_LE
        if media_type not in ("multipart/related", "multipart/*"):
            continue
        if not _matches(params.get("type", part_type).lower(), part_type):
            continue
        syntax = params.get("transfer-syntax", EXPLICIT_LE)
        if syntax in ("*", EXPLICIT_LE):
            return syntax
    raise DicomWebError(406, f'Only multipart/related; type="{part_type}" is available, '
                        f"with transfer-syntax {EXPLICIT_LE} or *.")


def negotiate_json(accept):
    """DicomWebError 406 unless the Accept header takes ``application/dicom+json``."""
    for media_type, _params in _accepted(accept):
        if _matches(media_type, "application/dicom+json") or media_type == "application/json":
            return "application/dicom+json"
    raise DicomWebError(406, "Only application/dicom+json is available.")


def negotiate_image(accept):
    """``image/png`` when the Accept header takes it; DicomWebError 406 otherwise (there is
    no JPEG encoder here)."""
    for media_type, _params in _accepted(accept):
        if _matches(media_type, "image/png"):
            return "image/png"
    raise DicomWebError(406, "Only image/png is available.")


# --- the JSON model ---------------------------------------------------------------------

def tag_hex(tag):
    return f"{int(tag):08X}"


def keyword_of(key):
    """The DICOM keyword a query key names (keyword or 8 hex digits), else None."""
    if len(key) == 8:
        try:
            keyword = keyword_for_tag(int(key, 16))
        except ValueError:
            keyword = None
        if keyword:
            return keyword
    return key if tag_for_keyword(key) is not None else None


@functools.lru_cache(maxsize=1024)
def _attribute_info(keyword):
    """(tag as 8 hex digits, VR) of a keyword, or None for no attribute or file meta; the
    dictionary look-ups cost more than the rest of a search answer."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag >> 16 == 0x0002:
        return None
    return tag_hex(tag), dictionary_VR(tag).split(" or ")[0]


def json_attribute(keyword, value):
    """``(tag, {"vr": ..., "Value": [...]})`` of a keyword and a plain value (str, number,
    list of them, None or "" for an empty attribute)."""
    tag, vr = _attribute_info(keyword)
    return tag, _json_element(vr, _converter(vr), value)


_INT_VRS = frozenset(("IS", "SL", "SS", "UL", "US", "SV", "UV"))
_FLOAT_VRS = frozenset(("DS", "FL", "FD"))
RETRIEVE_URL_TAG = "00081190"


def _person_name(value):
    return {"Alphabetic": str(value)}


def _converter(vr):
    """How one value of an attribute of ``vr`` is written in the JSON model."""
    if vr == "PN":
        return _person_name
    if vr in _INT_VRS:
        return int
    if vr in _FLOAT_VRS:
        return float
    return str


def _json_element(vr, convert, value):
    """The JSON model of an attribute's value; None, "" and empty lists give no Value."""
    if isinstance(value, (list, tuple)):
        values = [convert(v) for v in value if v is not None and v != ""]
    elif value is None or value == "":
        values = None
    else:
        values = [convert(value)]
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _retrieve_url(base_url, match, level):
    url = f"{base_url}/studies/{match.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{match.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{match.get('SOPInstanceUID', '')}"
    return url


@functools.lru_cache(maxsize=256)
def _match_layout(keywords):
    """``(keyword, tag, VR, converter)`` of each attribute among a match's keywords, in tag
    order, with the RetrieveURL (keyword None) in its place: every match of a search has
    the same keywords, so this is worked out once."""
    items = {}
    for keyword in keywords:
        info = _attribute_info(keyword)
        if info is not None:  # file meta (TransferSyntaxUID) is no attribute of an answer
            items[info[0]] = (keyword, *info, _converter(info[1]))
    items[RETRIEVE_URL_TAG] = (None, RETRIEVE_URL_TAG, "UR", None)
    return tuple(items[tag] for tag in sorted(items))


def match_json(match, level, base_url):
    """One search match (keyword -> value) in the JSON model, with its RetrieveURL."""
    out = {}
    for keyword, tag, vr, convert in _match_layout(tuple(match)):
        if keyword is None:
            out[tag] = {"vr": "UR", "Value": [_retrieve_url(base_url, match, level)]}
            continue
        value = match[keyword]
        if value is None or value == "":  # the commonest cases first, without a call
            out[tag] = {"vr": vr}
        elif convert is str and type(value) is str:
            out[tag] = {"vr": vr, "Value": [value]}
        else:
            out[tag] = _json_element(vr, convert, value)
    return out


def _strip(dataset, include_patient):
    """Drop what metadata leaves out, at every depth: pixel data and large binary values
    (no bulk data service here), and patient attributes unless ``include_patient``."""
    for elem in list(dataset):
        if elem.tag.group == PATIENT_GROUP and not include_patient:
            del dataset[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value or ():
                _strip(item, include_patient)
        elif elem.tag.group == 0x7FE0 or (
                elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN")
                and elem.value is not None and len(elem.value) > INLINE_BINARY_MAX):
            del dataset[elem.tag]


def instance_metadata(path, include_patient):
    """The JSON model of a stored instance's header (dict), as metadata gives it."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    _strip(dataset, include_patient)
    try:
        return dataset.to_json_dict(bulk_data_threshold=INLINE_BINARY_MAX)
    except Exception:  # a value pydicom cannot convert: give it element by element
        out = {}
        for elem in dataset:
            try:
                out.update(pydicom.Dataset([elem]).to_json_dict())
            except Exception:
                log.info("Left %s of %s out of its metadata", elem.tag, path)
        return out


def metadata_stream(files, include_patient, memo=None):
    """A JSON array of the metadata of StoredFiles, chunk by chunk.

    ``memo`` (a ``memo.Memo``) keeps encoded answers per file: a stored file is never
    changed in place (a re-import renames a new file over it), so its inode, size and
    modification time name its content, and a viewer opening a series again costs no
    parse.
    """
    yield b"["
    for index, stored in enumerate(files):
        yield (b"," if index else b"") + _encoded_metadata(stored.path, include_patient, memo)
    yield b"]"


def _encoded_metadata(path, include_patient, memo):
    def build():
        return orjson.dumps(instance_metadata(path, include_patient))
    if memo is None:
        return build()
    try:
        stat = os.stat(path)
    except OSError:
        return build()  # gone meanwhile: pydicom reports it
    return memo.get((path, stat.st_ino, stat.st_size, stat.st_mtime_ns, include_patient),
                    build)


# --- QIDO-RS ----------------------------------------------------------------------------

def _non_negative(args, name):
    value = args.get(name)
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise DicomWebError(400, f"The {name} must be a non-negative integer.")
    return int(value)


def _include_fields(args):
    fields = []
    for value in args.getlist("includefield"):
        fields.extend(part.strip() for part in value.split(",") if part.strip())
    return fields


def _default_attributes(level, scoped_study, scoped_series):
    """What a search returns unless asked for more (PS3.18 Table 6.7.1-2)."""
    if level == "STUDY":
        return STUDY_ATTRIBUTES
    if level == "SERIES":
        return SERIES_ATTRIBUTES + (() if scoped_study else STUDY_ATTRIBUTES)
    return (INSTANCE_ATTRIBUTES + (() if scoped_series else SERIES_ATTRIBUTES)
            + (() if scoped_study else STUDY_ATTRIBUTES))


@dataclass
class SearchResult:
    """The answer of a search: JSON matches and the Warning header's text (or None)."""
    matches: list
    warning: str | None = None


def search(resource, args, domains, include_patient, base_url, study_uid=None,
           series_uid=None):
    """QIDO-RS: the matches of ``resource`` (studies, series, instances) for the query
    parameters ``args`` (a MultiDict), in the JSON model.

    Raises
    ------
    DicomWebError
        400 for a malformed limit, offset or matching value.
    """
    level = LEVELS[resource]
    limit, offset = _non_negative(args, "limit"), _non_negative(args, "offset") or 0
    keys, unmatched = {}, []
    for key in args:
        if key.lower() in CONTROL_PARAMETERS:
            continue
        keyword = keyword_of(key)
        if keyword is None or (keyword in PATIENT_KEYS and not include_patient):
            # Patient keys of a caller who may not see them: matching would reveal them.
            unmatched.append(key)
            continue
        keys[keyword] = args.get(key)
    if study_uid is not None:
        keys["StudyInstanceUID"] = study_uid
    if series_uid is not None:
        keys["SeriesInstanceUID"] = series_uid
    requested = set(keys)
    wanted = list(_default_attributes(level, study_uid is not None, series_uid is not None))
    fields = _include_fields(args)
    if any(f.lower() == "all" for f in fields):
        wanted += [k for k in ALL_ATTRIBUTES[level] if k not in wanted]
    for name in fields:
        keyword = keyword_of(name)
        if keyword is not None:
            wanted.append(keyword)
        elif name.lower() != "all":
            unmatched.append(name)
    for keyword in wanted:
        if include_patient or keyword not in PATIENT_KEYS:
            keys.setdefault(keyword, "")
    cap = min(limit, MAX_RESULTS) if limit is not None else MAX_RESULTS
    try:
        found, ignored = query.find(level, keys, domains, limit=cap + 1, offset=offset,
                                    include_patient=include_patient)
    except query.QueryError as exc:
        raise DicomWebError(400, f"The query is not valid: {exc}") from None
    unmatched += [k for k in ignored if k in requested and keys[k] != ""]
    warnings = []
    if unmatched:
        # Names come from the URL: only printable ASCII may go into a header.
        names = dict.fromkeys(_HEADER_UNSAFE.sub("?", name)[:64] for name in unmatched)
        warnings.append("The fields " + ", ".join(names) + " are not supported and were "
                        "ignored")
    if len(found) > cap:
        found = found[:cap]
        warnings.append("There are more matches than returned")
    matches = [match_json(m if include_patient else
                          {k: v for k, v in m.items() if k not in PATIENT_KEYS},
                          level, base_url) for m in found]
    warning = "; ".join(warnings) or None
    return SearchResult(matches, f'299 CIRCUS: "{warning}"' if warning else None)


# --- WADO-RS ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredFile:
    """What a retrieval needs of one stored instance, read before the answer streams (the
    rows' session is gone by then)."""
    path: str
    series_uid: str
    instance_number: int
    transfer_syntax_uid: str
    number_of_frames: int | None


def find_files(domains, study_uid, series_uid=None, sop_instance_uid=None):
    """The StoredFiles of a study, series or instance in ``domains``, in order;
    DicomWebError 404 when there are none."""
    files = [StoredFile(path, row.series_uid, row.instance_number, row.transfer_syntax_uid,
                        row.number_of_frames)
             for row, path in query.instance_files(domains, study_uid=study_uid,
                                                   series_uid=series_uid,
                                                   sop_instance_uid=sop_instance_uid)]
    if not files:
        raise _not_found()
    return files


def _file_chunks(path):
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(READ_CHUNK)
            if not chunk:
                return
            yield chunk


def _explicit_le(path):
    """The file re-encoded in Explicit VR Little Endian (pixel data decoded), as bytes."""
    dataset = pydicom.dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress()  # sets Explicit VR Little Endian
    else:
        dataset.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    out = BytesIO()
    dataset.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def instance_parts(files, syntax):
    """``(content type, chunks)`` of each file for a multipart answer: as stored, or in
    Explicit VR Little Endian. A file that cannot be re-encoded is left out (and
    logged): the answer has already started."""
    for row in files:
        path, stored = row.path, row.transfer_syntax_uid
        if syntax == "*" or stored == EXPLICIT_LE:
            yield f"application/dicom; transfer-syntax={stored}", _file_chunks(path)
            continue
        try:
            data = _explicit_le(path)
        except Exception as exc:  # pydicom and the codecs fail in many ways
            log.warning("Cannot re-encode %s (%s) in Explicit VR Little Endian: %s",
                        path, stored, exc)
            continue
        yield f"application/dicom; transfer-syntax={EXPLICIT_LE}", iter((data,))


def multipart(parts, boundary):
    """The body of a multipart/related answer from ``(content type, chunks)`` parts."""
    delimiter = b"--" + boundary.encode("ascii")
    for content_type, chunks in parts:
        yield delimiter + b"\r\nContent-Type: " + content_type.encode("ascii") + b"\r\n\r\n"
        yield from chunks
        yield b"\r\n"
    yield delimiter + b"--\r\n"


def new_boundary():
    return secrets.token_hex(16)


def parse_frame_list(text):
    """``"1,3"`` -> [1, 3]; DicomWebError 400 unless positive integers."""
    numbers = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise DicomWebError(400, "Frame numbers must be positive integers.")
        numbers.append(int(part))
    return numbers


def _frame_count(row):
    return row.number_of_frames or 1


def check_frames(row, numbers):
    """DicomWebError 404 when a frame number is beyond the instance's frames."""
    if any(n > _frame_count(row) for n in numbers):
        raise DicomWebError(404, f"The instance has {_frame_count(row)} frame(s).")


def frame_bytes(row, numbers):
    """The uncompressed pixel data (Explicit VR Little Endian order) of each frame."""
    dataset = pydicom.dcmread(row.path)
    count = _frame_count(row)
    if row.transfer_syntax_uid in NATIVE_SYNTAXES and dataset.get("BitsAllocated", 8) >= 8:
        data = dataset.PixelData
        size = len(data) // count
        return [data[(n - 1) * size:n * size] for n in numbers]
    pixels = dataset.pixel_array
    if count == 1:
        pixels = pixels[np.newaxis]
    return [np.ascontiguousarray(pixels[n - 1]).astype(
        pixels.dtype.newbyteorder("<"), copy=False).tobytes() for n in numbers]


def frame_parts(frames):
    return [(f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", iter((frame,)))
            for frame in frames]


# --- rendered images ----------------------------------------------------------------------

def parse_window(text):
    """``center,width[,function]`` -> (center, width); DicomWebError 400 if malformed."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise DicomWebError(400, "The window must be center,width[,function].") from None
    if len(parts) > 3 or not np.isfinite([center, width]).all() or width <= 0 or (
            len(parts) == 3 and parts[2].strip().upper() not in ("LINEAR", "")):
        raise DicomWebError(400, "The window must be center,width[,LINEAR] with width > 0.")
    return center, width


def parse_viewport(text, default=None):
    """``width,height`` -> (width, height) of the largest image wanted, or ``default``."""
    if text is None:
        return default
    parts = text.split(",")
    if len(parts) < 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts[:2]):
        raise DicomWebError(400, "The viewport must be width,height (positive integers).")
    return int(parts[0]), int(parts[1])


def _frame_pixels(row, frame):
    """The frame's pixels as HU (CT) or stored values, MONOCHROME1 inverted; RGB as gray."""
    if _frame_count(row) == 1:
        slice_ = volumes.read_slice(row.path, row.instance_number, row.series_uid)
        pixels = slice_.pixels
        if slice_.pixel_format == "rgba8":
            pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
        return pixels.astype(np.float64)
    dataset = pydicom.dcmread(row.path)
    pixels = dataset.pixel_array[frame - 1].astype(np.float64)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return pixels


def _default_window(row, pixels):
    try:
        window = volumes.image_attributes(row.path, row.instance_number,
                                          row.series_uid)["window"]
    except volumes.VolumeError:
        window = None
    if window and np.isfinite([window["level"], window["width"]]).all() \
            and window["width"] > 0:
        return window["level"], window["width"]
    low, high = float(pixels.min()), float(pixels.max())
    return (low + high) / 2, max(high - low, 1.0)


def _fit(image, viewport):
    """Nearest-neighbour downscale of ``image`` to fit ``viewport`` (never upscaled)."""
    if viewport is None:
        return image
    height, width = image.shape
    scale = min(viewport[0] / width, viewport[1] / height, 1.0)
    if scale >= 1.0:
        return image
    rows = (np.arange(max(1, round(height * scale))) / scale).astype(int)
    cols = (np.arange(max(1, round(width * scale))) / scale).astype(int)
    return image[rows][:, cols]


def render_png(row, frame=1, window=None, viewport=None):
    """A frame of a StoredFile as an 8-bit grayscale PNG with the given window (else the
    file's own, else its full range), downscaled to fit ``viewport``."""
    try:
        pixels = _frame_pixels(row, frame)
    except volumes.VolumeError as exc:
        raise DicomWebError(406, f"The image cannot be rendered ({exc}).") from None
    center, width = window or _default_window(row, pixels)
    image = np.clip(np.asarray(apply_window(pixels, width, center)), 0, 255).astype(np.uint8)
    return encode_png(np.ascontiguousarray(_fit(image, viewport)))


# --- STOW-RS ----------------------------------------------------------------------------

_DOMAIN_PARAMS = db.select(ServerParam.key, ServerParam.value).where(
    ServerParam.key.in_(("domains", "defaultDomain")))


def target_domain(requested):
    """The domain STOW-RS imports into: ``requested``, else the server's default domain
    (``defaultDomain``, else the first of ``domains``); DicomWebError 400 when unknown."""
    params = dict(db.session.connection().execute(_DOMAIN_PARAMS).all())
    domains = params.get("domains") if isinstance(params.get("domains"), list) else []
    if requested is None:
        default = params.get("defaultDomain")
        requested = default if isinstance(default, str) and default else (
            domains[0] if domains else None)
        if requested is None:
            raise DicomWebError(400, "The server has no default domain; give ?domain=.")
    if requested not in domains:
        raise DicomWebError(400, f'The domain "{requested}" does not exist.')
    return requested


def check_stow_content_type(mimetype, params):
    """The boundary of a STOW-RS body; DicomWebError 415 unless multipart/related of
    application/dicom parts."""
    if mimetype != "multipart/related":
        raise DicomWebError(415, 'The body must be multipart/related; type="application/dicom".')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise DicomWebError(415, "Only application/dicom parts are stored "
                            f"(not {part_type}).")
    boundary = params.get("boundary", "")
    if not boundary:
        raise DicomWebError(400, "The multipart body has no boundary.")
    return boundary.encode("ascii", "replace")


class _PartFile:
    """A spooled part: a file that refuses to grow beyond ``limit`` bytes. A part of at
    most ``keep`` bytes is also kept in memory, so that it is checked without reading it
    back (only until it is staged: memory holds one part at a time)."""

    def __init__(self, path, limit, content_type, keep=batch_module.SMALL_ENTRY_BYTES):
        self.path = path
        self.limit = limit
        self.content_type = content_type
        self.size = 0
        self.keep = keep
        self.chunks = []
        self.fh = open(path, "wb")

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise multipart_spool.MultipartTooLarge("part too large")
        if self.chunks is not None:
            if self.size <= self.keep:
                self.chunks.append(bytes(data))
            else:
                self.chunks = None
        return self.fh.write(data)

    def close(self):
        self.fh.close()

    def take_data(self):
        """The part's bytes if kept in memory (else None); memory is released."""
        chunks, self.chunks = self.chunks, None
        if chunks is None:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@dataclass
class StoreResult:
    """What a STOW-RS request stored and what failed, as JSON model items."""
    stored: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    study_uids: set = field(default_factory=set)

    @property
    def status(self):
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self, base_url):
        out = {}
        if len(self.study_uids) == 1:
            out["00081190"] = {"vr": "UR",
                               "Value": [f"{base_url}/studies/{next(iter(self.study_uids))}"]}
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": self.failed}
        out["00081199"] = {"vr": "SQ", "Value": self.stored}
        return out


@dataclass
class _Part:
    path: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    staged_series: str | None = None  # the series the batch filed it under


def _item(part, reason=None, url=None):
    item = {}
    if part.sop_class_uid:
        item["00081150"] = {"vr": "UI", "Value": [part.sop_class_uid]}
    if part.sop_instance_uid:
        item["00081155"] = {"vr": "UI", "Value": [part.sop_instance_uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    if url is not None:
        item["00081190"] = {"vr": "UR", "Value": [url]}
    return item


_ID_TAGS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018,
            "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E}


def _identify(part, data=None):
    """Read the part's UIDs (from ``data``, its bytes, or its file): with the importer's
    header walk (which keeps them for the instance rules), else pydicom for an unusual file;
    NotDicomError unless it looks like DICOM, BrokenDicomError when it cannot be read.
    Returns the walk's Header (for ``read_keys``), or None."""
    with (BytesIO(data) if data is not None else open(part.path, "rb")) as fh:
        if not is_dicm(fh.read(DICM_OFFSET + 4)):
            raise NotDicomError("The part is not a DICOM file.")
        fh.seek(0)
        header = scan(fh, len(data) if data is not None else os.fstat(fh.fileno()).st_size)
        if header is not None:
            found = {keyword: header.raw(tag) for keyword, tag in _ID_TAGS.items()}
            found = {k: v.decode("ascii", "replace") if v is not None else None
                     for k, v in found.items()}
            meta = {}
        else:
            fh.seek(0)
            try:
                dataset = pydicom.dcmread(fh, stop_before_pixels=True,
                                          specific_tags=list(_ID_TAGS))
            except Exception:  # pydicom's many ways of failing on untrusted bytes
                raise BrokenDicomError("The part cannot be parsed.") from None
            found = {keyword: dataset.get(keyword) for keyword in _ID_TAGS}
            meta = getattr(dataset, "file_meta", None) or {}

    def text(keyword, fallback=None):
        value = str(found.get(keyword) or fallback or "").strip("\x00 ")
        return value or None
    part.sop_class_uid = text("SOPClassUID", meta.get("MediaStorageSOPClassUID"))
    part.sop_instance_uid = text("SOPInstanceUID", meta.get("MediaStorageSOPInstanceUID"))
    part.study_uid = text("StudyInstanceUID")
    part.series_uid = text("SeriesInstanceUID")
    return header


def store(stream, boundary, domain, base_url, study_uid=None, part_max_bytes=None,
          max_parts=None):
    """STOW-RS: import each application/dicom part of a multipart/related body into
    ``domain`` through one import batch; return a StoreResult.

    Each part is spooled to the batch's staging folder as it arrives and staged as soon as
    it is complete (checked from memory, its header walked once). A part that is not
    DICOM, is truncated, names another study than ``study_uid`` or belongs to a series of
    another domain (found by the commit, under its locks) fails alone; the others are
    committed together. Should the commit itself fail, every part staged for it fails and
    nothing of it stays.

    Raises
    ------
    DicomWebError
        400 for a malformed body, 413 for a part or a number of parts beyond the limits.
    """
    result = StoreResult()
    with ImportBatch(domain) as batch:
        parts = []  # (part, failure reason or None), in the body's order
        pending = []  # the last spooled part, staged once the next starts or the body ends

        def stage_pending(sync_now):
            sink = pending.pop()
            sink.close()
            part = _Part(sink.path)
            reason = _stage(batch, part, sink, study_uid, sync_now)
            if reason is not None:
                unlink_quietly(part.path)
            parts.append((part, reason))

        def on_part(headers):
            if pending:
                stage_pending(False)
            content_type = parse_options_header(headers.get("content-type", ""))[0].lower()
            sink = _PartFile(os.path.join(batch.dir, f"{batch.prefix}-stow-"
                                          f"{len(parts) + 1:06d}"),
                             part_max_bytes or float("inf"), content_type)
            pending.append(sink)
            return sink
        try:
            multipart_spool.parse(stream, boundary, on_part=on_part, chunk=READ_CHUNK,
                                  max_parts=max_parts)
        except multipart_spool.MultipartTooLarge:
            raise DicomWebError(413, "request entity too large") from None
        except multipart_spool.MultipartError:
            raise DicomWebError(400, "The multipart body could not be parsed.") from None
        finally:
            for sink in pending:
                sink.close()
        if not pending:
            raise DicomWebError(400, "The multipart body has no part.")
        # One part: its fsync starts at once and overlaps the checks (as /single does).
        stage_pending(sync_now=not parts)
        conflicts = set()
        try:
            batch.commit(conflicts)
        except DicomImportError as exc:
            log.info("STOW-RS batch into %s failed: %s", domain, exc)
            result.failed.extend(_item(part, reason if reason is not None else
                                       PROCESSING_FAILURE) for part, reason in parts)
            return result
    for part, reason in parts:
        if reason is None and part.staged_series in conflicts:
            reason = PROCESSING_FAILURE  # its series is in another domain
        if reason is not None:
            result.failed.append(_item(part, reason))
            continue
        result.study_uids.add(part.study_uid)
        result.stored.append(_item(part, url=f"{base_url}/studies/{part.study_uid}/series/"
                                             f"{part.series_uid}/instances/"
                                             f"{part.sop_instance_uid}"))
    return result


def _stage(batch, part, sink, study_uid, sync_now=False):
    """Stage one spooled part into ``batch``; the failure reason, or None when staged."""
    if sink.content_type not in ("", "application/dicom"):
        return CANNOT_UNDERSTAND
    data = sink.take_data()
    try:
        header = _identify(part, data)
    except DicomImportError:
        return CANNOT_UNDERSTAND
    if study_uid is not None and part.study_uid != study_uid:
        return STUDY_MISMATCH
    try:
        record = batch.add_staged(part.path, sync_now=sync_now, data=data, header=header)
    except (NotDicomError, BrokenDicomError):
        return CANNOT_UNDERSTAND
    except DicomImportError:
        return PROCESSING_FAILURE
    part.staged_series = record.series_uid
    return None
