"""Series as a domain object: partial volume descriptors, orientation, deletion, the
series search; the image range strings (``dicom.image_ranges``) are offered here too.

Used by the series routes, the image server, cases, plug-in jobs and exports. The
``images`` string of a series is CIRCUS's multi-integer-range form (``"1-3,5,8-10"``); a
partial volume descriptor (PVD, API.md 4.1) is ``{"start", "end", "delta"}``.
"""
import functools
import json
import logging
import os

import pydicom
import sqlalchemy as sa
from pydicom.errors import InvalidDicomError

import storage
from dicom import volumes
from dicom.image_ranges import (  # noqa: F401  (the series' API, used by routes and domain)
    ImagesStringError, has_image, images_string, merge_images, parse_images, parse_ranges)
from errors import ApiError, get_or_404, not_found
from models import CaseSeries, MyListItem, PluginJobSeries, Series, db, new_ulid
from search import SearchSpec

log = logging.getLogger(__name__)

POSITION_TAG = "ImagePositionPatient"

# API.md 1.8: the series filter keys (patientInfo.* read the indexed copies).
SEARCH_FIELDS = {
    "modality": Series.modality,
    "seriesUid": Series.series_uid,
    "studyUid": Series.study_uid,
    "seriesDescription": Series.series_description,
    "patientInfo.patientId": Series.patient_id,
    "patientInfo.patientName": Series.patient_name,
    "patientInfo.age": Series.patient_age,
    "patientInfo.sex": Series.patient_sex,
    "seriesDate": Series.series_date,
    "createdAt": Series.created_at,
}
SORT_FIELDS = {**SEARCH_FIELDS, "updatedAt": Series.updated_at, "domain": Series.domain,
               "bodyPart": Series.body_part, "stationName": Series.station_name,
               "manufacturer": Series.manufacturer, "modelName": Series.model_name}
# Lists select plain rows of the document's columns (Series.document_columns(as_text=True)).
_SEARCHES = {(show, False): SearchSpec(
    SEARCH_FIELDS, functools.partial(Series.row_to_json, with_patient_info=show, as_text=True),
    {"createdAt": -1}, sort_fields=SORT_FIELDS, count_tables=("series",), plain_rows=True)
    for show in (False, True)}
_SEARCHES.update({(show, True): SearchSpec(
    SEARCH_FIELDS, _SEARCHES[show, False].serialize, {"addedToListAt": -1},
    sort_fields={**SORT_FIELDS, "addedToListAt": MyListItem.created_at}, plain_rows=True)
    for show in (False, True)})


def search_spec(show_personal_info, in_my_list=False):
    """The series search (``in_my_list``: of a my list, joined on MyListItem)."""
    return _SEARCHES[bool(show_personal_info), in_my_list]


class OrientationError(ApiError):
    """Raised when the files needed to decide a series' orientation are missing or unusable.

    Answered as CIRCUS does: 500 with ``no image`` (missing file) or ``invalid image``.
    """

    def __init__(self, message):
        super().__init__(500, message)


# --- partial volume descriptors --------------------------------------------------------

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def pvd_json(pvd):
    """The PVD as compact JSON, as CIRCUS quotes it in error messages."""
    return json.dumps(pvd, separators=(",", ":"), default=str)


def is_valid_pvd(pvd):
    """Whether ``pvd`` is a valid partial volume descriptor (API.md 4.1; delta required)."""
    if not isinstance(pvd, dict) or set(pvd) != {"start", "end", "delta"}:
        return False
    start, end, delta = pvd["start"], pvd["end"], pvd["delta"]
    if not (_is_int(start) and _is_int(end) and _is_int(delta)):
        return False
    if start < 1 or end < 1 or delta == 0:
        return False
    if (start > end and delta > 0) or (start < end and delta < 0):
        return False
    if start == end and delta == -1:
        return False
    return (end - start) % delta == 0


def validate_pvd(pvd):
    """Raise ApiError 400 ``Invalid partial volume descriptor: <json>`` unless valid."""
    if not is_valid_pvd(pvd):
        raise ApiError(400, f"Invalid partial volume descriptor: {pvd_json(pvd)}")
    return pvd


def pvd_images(pvd):
    """The image numbers selected by a valid PVD, in its order (start, start+delta, ..., end)."""
    return volumes.pvd_images(validate_pvd(pvd))


def check_pvd_range(series, pvd):
    """Raise ApiError 400 ``Specified range is invalid.`` unless every image of the PVD is
    stored in ``series`` (an empty selection is invalid too)."""
    wanted = pvd_images(pvd)
    ranges = parse_ranges(series.images)
    if not wanted or not all(any(a <= n <= b for a, b in ranges) for n in wanted):
        raise ApiError(400, "Specified range is invalid.")


# --- look-up ----------------------------------------------------------------------------

def get_series(series_uid):
    """The series row, or ApiError 404 ``The requested series was not found.``"""
    return get_or_404(Series, series_uid, "series")


# --- orientation ------------------------------------------------------------------------

def _position_z(series_uid, number):
    """Image Position (Patient) z of one stored instance (OrientationError if unusable)."""
    try:
        path = storage.instance_path(series_uid, number)
    except storage.UnsafePathError:
        raise OrientationError("no image") from None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[POSITION_TAG])
    except (OSError, InvalidDicomError):
        raise OrientationError("no image") from None
    except Exception:  # a broken header: the file exists but says nothing usable
        raise OrientationError("invalid image") from None
    try:
        return float(dataset[POSITION_TAG].value[2])
    except (KeyError, IndexError, TypeError, ValueError):
        raise OrientationError("invalid image") from None


def orientation(series, start=None, end=None):
    """``"head-first"`` or ``"foot-first"`` for images ``start..end`` of ``series``.

    The answer is for the ascending order of instance numbers whatever the order of
    ``start`` and ``end`` (quirk 32 fixed), and a z position of 0 is a real position:
    head-first when z(lower number) >= z(higher number). Defaults are the smallest and
    largest stored numbers. A single image is head-first without reading any file.

    Raises
    ------
    OrientationError
        500 ``no image`` / ``invalid image`` when a file is missing or has no position.
    """
    numbers = parse_ranges(series.images)
    if not numbers:
        raise OrientationError("no image")
    if start is None:
        start = numbers[0][0]
    if end is None:
        end = numbers[-1][1]
    low, high = min(start, end), max(start, end)
    if low == high:
        return "head-first"
    return "head-first" if _position_z(series.series_uid, low) >= _position_z(
        series.series_uid, high) else "foot-first"


def auto_pvd(series):
    """The PVD meant by ``"auto"``: the first contiguous run of images, head-first order."""
    ranges = parse_ranges(series.images)
    if not ranges:
        raise OrientationError("no image")
    first, last = ranges[0]
    if orientation(series, first, last) == "head-first":
        return {"start": first, "end": last, "delta": 1}
    return {"start": last, "end": first, "delta": -1}


def resolve_pvd(series_uid, pvd):
    """Resolve ``"auto"`` to a concrete PVD; anything else is returned unchanged.

    Raises
    ------
    ApiError
        404 ``The requested series was not found.`` for an unknown series; 500
        ``Internal server error.`` when the orientation cannot be read (as CIRCUS).
    """
    if pvd != "auto":
        return pvd
    series = get_series(series_uid)
    try:
        return auto_pvd(series)
    except OrientationError as exc:
        log.warning("Cannot resolve the auto PVD of %s: %s", series_uid, exc.message)
        raise ApiError(500, "Internal server error.") from None


# --- deletion ---------------------------------------------------------------------------

def delete_series(series_uid):
    """Delete a series row and its DICOM files in one step.

    Raises
    ------
    ApiError
        404 if the series vanished; 400 ``There is a plug-in job associated with this
        series.`` or ``There is a case associated with this series.`` (CIRCUS's checks).
    """
    # The DELETE comes first: it takes the write lock (SQLite) or the row lock, so no
    # import, case or job can slip in between the checks and the commit.
    deleted = db.session.execute(sa.delete(Series).where(Series.series_uid == series_uid)
                                 .execution_options(synchronize_session=False)).rowcount
    if deleted != 1:
        db.session.rollback()
        raise not_found("series")
    for model, message in ((PluginJobSeries, "There is a plug-in job associated with this series."),
                           (CaseSeries, "There is a case associated with this series.")):
        if db.session.execute(sa.select(sa.literal(1)).where(
                model.series_uid == series_uid).limit(1)).first() is not None:
            db.session.rollback()
            raise ApiError(400, message)
    folder = storage.series_dir(series_uid)
    parked = storage.dicom_staging_dir("deleted-" + new_ulid())
    moved = False
    if os.path.isdir(folder):
        # Parked under the lock: an import committing after us starts a fresh folder.
        os.makedirs(os.path.dirname(parked), exist_ok=True)
        os.replace(folder, parked)
        moved = True
    try:
        db.session.commit()
    except BaseException:
        db.session.rollback()
        if moved:
            os.replace(parked, folder)
        raise
    if moved:
        storage.remove_tree(parked)
