"""DICOM attribute matching over the index: what C-FIND (DIMSE) and QIDO-RS (DICOMweb) ask.

A query is a level (``PATIENT``, ``STUDY``, ``SERIES``, ``IMAGE``) and identifier keys
``{keyword: value}`` in DICOM's string form (PS3.4 C.2.2.2): ``""`` asks for the attribute
(universal matching), ``*`` and ``?`` are wildcards on text keys, ``a-b`` / ``-b`` / ``a-``
are date ranges, ``uid1\\uid2`` a list of UIDs. Only series of the given domains are seen.
Answers are dicts of keyword -> value, ordered by study, series and instance number.
"""
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

import storage
from dicom.instance import UID_RE, default_offset
from models import Instance, Series, db

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
FETCH_WINDOW = 16  # instance files asked of the store ahead of the reader
PATIENT_KEYS = frozenset(("PatientID", "PatientName", "PatientBirthDate", "PatientSex"))
DATE_RE = re.compile(r"^\d{8}$")
INT_RE = re.compile(r"^[+-]?\d{1,10}$")


class QueryError(ValueError):
    """A malformed identifier: a bad date range, a wildcard or a bad value in a UID key."""


@dataclass(frozen=True)
class Key:
    """A matching key: its level, the column it matches (None: returned only) and its kind
    (``uid``, ``text``, ``name`` (case-insensitive), ``code`` (lists allowed), ``date``,
    ``int``)."""
    level: str
    column: object
    kind: str


KEYS = {
    "PatientID": Key("PATIENT", Series.patient_id, "text"),
    "PatientName": Key("PATIENT", Series.patient_name, "name"),
    "PatientBirthDate": Key("PATIENT", None, "date"),
    "PatientSex": Key("PATIENT", Series.patient_sex, "code"),
    "StudyInstanceUID": Key("STUDY", Series.study_uid, "uid"),
    "StudyDate": Key("STUDY", Series.study_date, "date"),
    "StudyTime": Key("STUDY", None, "text"),
    "AccessionNumber": Key("STUDY", Series.accession_number, "text"),
    "StudyDescription": Key("STUDY", Series.study_description, "text"),
    "StudyID": Key("STUDY", Series.study_id, "text"),
    "ReferringPhysicianName": Key("STUDY", Series.referring_physician_name, "name"),
    "ModalitiesInStudy": Key("STUDY", Series.modality, "code"),  # any series of the study
    "SeriesInstanceUID": Key("SERIES", Series.series_uid, "uid"),
    "SeriesNumber": Key("SERIES", Series.series_number, "int"),
    "SeriesDescription": Key("SERIES", Series.series_description, "text"),
    "Modality": Key("SERIES", Series.modality, "code"),
    "SeriesDate": Key("SERIES", Series.series_date, "date"),
    "SOPInstanceUID": Key("IMAGE", Instance.sop_instance_uid, "uid"),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid, "uid"),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, "int"),
}
COUNTS = {  # computed return keys: level they describe -> keys
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
}
RETURNED = {key for counts in COUNTS.values() for key in counts} | {"NumberOfFrames",
                                                                    "TransferSyntaxUID"}


# What a match shows of a series and an instance, read as plain rows of the tables'
# columns: ORM entities would also load (and decode) the ``parameters`` document and fill
# the identity map, and the ORM's annotated columns make every execution of a new statement
# compare each of them with its cached twin; both cost more than the rest of a search.
_SERIES, _INSTANCES = Series.__table__.c, Instance.__table__.c
_SERIES_COLUMNS = (
    _SERIES.series_uid, _SERIES.study_uid, _SERIES.patient_id, _SERIES.patient_name,
    _SERIES.patient_info, _SERIES.patient_sex, _SERIES.study_date, _SERIES.study_time,
    _SERIES.accession_number, _SERIES.study_description, _SERIES.study_id,
    _SERIES.referring_physician_name, _SERIES.series_number, _SERIES.modality,
    _SERIES.series_description, _SERIES.series_date)
_INSTANCE_COLUMNS = (_INSTANCES.sop_instance_uid, _INSTANCES.sop_class_uid,
                     _INSTANCES.instance_number, _INSTANCES.number_of_frames, _INSTANCES.rows,
                     _INSTANCES.columns, _INSTANCES.transfer_syntax_uid)
# A series' instances, counted in the statement that reads the series (once per row read).
_INSTANCE_COUNT = (sa.select(sa.func.count()).where(_INSTANCES.series_uid == _SERIES.series_uid)
                   .correlate(Series.__table__).scalar_subquery().label("instance_count"))
# The selects of series a search narrows, built once (``where`` copies them).
_SERIES_UIDS = sa.select(_SERIES.series_uid)
_SERIES_ROWS = sa.select(*_SERIES_COLUMNS, _INSTANCE_COUNT)


def _like(value):
    """A DICOM wildcard pattern as a LIKE pattern (``\\`` escapes % and _)."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _date(text):
    if not DATE_RE.match(text):
        raise QueryError(f"Invalid date {text!r}: expected YYYYMMDD or a range of such dates.")
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise QueryError(f"Invalid date {text!r}.") from None
    return text


def _date_range(value):
    """``(first, last)`` dates (either may be None) of a DA value or range."""
    if "-" not in value:
        return _date(value), _date(value)
    first, _, last = value.partition("-")
    if not first and not last or "-" in last:
        raise QueryError(f"Invalid date range {value!r}.")
    first, last = (_date(first) if first else None), (_date(last) if last else None)
    if first and last and first > last:
        raise QueryError(f"Invalid date range {value!r}: its start is after its end.")
    return first, last


def _condition(keyword, key, value):
    """The SQL condition of one non-universal key."""
    column, kind = key.column, key.kind
    if kind == "uid":
        uids = value.split("\\")
        for uid in uids:
            if "*" in uid or "?" in uid:
                raise QueryError(f"{keyword} does not take wildcards.")
            if not UID_RE.match(uid) or len(uid) > 64:
                raise QueryError(f"{keyword} holds an invalid UID {uid!r}.")
        return column.in_(uids)
    if kind == "date":
        first, last = _date_range(value)
        if keyword == "SeriesDate":  # stored as UTC datetimes: a local day is a span
            shift = timedelta(minutes=default_offset())
            bounds = []
            if first:
                bounds.append(column >= datetime.strptime(first, "%Y%m%d") - shift)
            if last:
                bounds.append(column < datetime.strptime(last, "%Y%m%d") + timedelta(1) - shift)
            return sa.and_(*bounds)
        return sa.and_(*([column >= first] if first else []), *([column <= last] if last else []))
    if kind == "int":
        if not INT_RE.match(value.strip()):
            raise QueryError(f"{keyword} must be an integer, not {value!r}.")
        return column == int(value)
    values = value.split("\\") if kind == "code" else [value]
    parts = []
    for item in values:
        if kind == "name":
            item, target = item.lower(), sa.func.lower(column)
        else:
            target = column
        parts.append(target.like(_like(item), escape="\\") if ("*" in item or "?" in item)
                     else target == item)
    return sa.or_(*parts)


def _split(level, keys, include_patient):
    """(conditions on series rows, conditions on instance rows, ModalitiesInStudy values,
    ignored keywords)."""
    if level not in LEVELS:
        raise QueryError(f"Unknown query level {level!r}.")
    series, instance, modalities, ignored = [], [], None, []
    for keyword, value in keys.items():
        key = KEYS.get(keyword)
        if key is None:
            if keyword not in RETURNED:
                ignored.append(keyword)
            continue
        if value is None or value == "" or value == "*":
            continue
        if key.column is None or (not include_patient and keyword in PATIENT_KEYS):
            ignored.append(keyword)  # not matched on (not stored, or not theirs to see)
            continue
        if LEVELS.index(key.level) > LEVELS.index(level):
            raise QueryError(f"{keyword} is not a key of the {level} level.")
        if keyword == "ModalitiesInStudy":
            modalities = value  # matched against any series of the study (_series_query)
        elif key.level == "IMAGE":
            instance.append(_condition(keyword, key, value))
        else:
            series.append(_condition(keyword, key, value))
    return series, instance, modalities, ignored


def _series_query(domains, series_conditions, modalities, select=_SERIES_UIDS):
    """``select`` (by default the UIDs) of the matching series."""
    query = select.where(Series.domain.in_(domains), *series_conditions)
    if modalities is not None:
        other = sa.orm.aliased(Series)
        query = query.where(sa.exists().where(
            other.study_uid == Series.study_uid, other.domain.in_(domains),
            _condition("ModalitiesInStudy", Key("STUDY", other.modality, "code"), modalities)))
    return query


def find(level, keys, domains, *, limit=None, offset=0, include_patient=True):
    """Match ``keys`` at ``level`` over the series of ``domains``.

    Returns
    -------
    (list of dict, list of str)
        The matches, keyword -> value, and the keys that were not matched on.

    Raises
    ------
    QueryError
        For a malformed identifier.
    """
    if limit is not None and limit < 0 or offset < 0:
        raise QueryError("limit and offset must not be negative.")
    series_c, instance_c, modalities, ignored = _split(level, keys, include_patient)
    if not domains:
        return [], ignored
    if level == "IMAGE":
        matches = _images(_series_query(domains, series_c, modalities), instance_c, limit,
                          offset)
    elif level == "SERIES":
        rows = _rows(_series_query(domains, series_c, modalities, _SERIES_ROWS)
                     .order_by(_SERIES.study_uid, _SERIES.series_uid).limit(limit).offset(offset))
        shift = timedelta(minutes=default_offset())
        matches = [{**_series_attributes(r, shift), "NumberOfSeriesRelatedInstances":
                    r.instance_count} for r in rows]
    else:
        group = Series.study_uid if level == "STUDY" else Series.patient_id
        picked = db.session.execute(
            sa.select(group).where(Series.series_uid.in_(
                _series_query(domains, series_c, modalities).scalar_subquery()))
            .group_by(group).order_by(group).limit(limit).offset(offset)).scalars().all()
        matches = _groups(level, group, picked, domains)
    if not include_patient:
        for match in matches:
            for key in PATIENT_KEYS:
                match.pop(key, None)
    return matches, ignored


def _rows(statement):
    """Plain rows of a Core statement, in the session's transaction."""
    return db.session.connection().execute(statement).all()


def _local_date_time(value, shift):
    """(DA, TM) of a stored UTC datetime in local time (``shift``: the server's UTC
    offset), or (None, None)."""
    if value is None:
        return None, None
    text = (value + shift).strftime("%Y%m%d%H%M%S")
    return text[:8], text[8:]


def _study_attributes(series):
    info = series.patient_info or {}
    return {"PatientID": series.patient_id, "PatientName": series.patient_name,
            # patientInfo keeps ISO dates ("1970-01-01"); DICOM answers them as DA
            "PatientBirthDate": (info.get("birthDate") or "").replace("-", "") or None,
            "PatientSex": series.patient_sex,
            "StudyInstanceUID": series.study_uid, "StudyDate": series.study_date,
            "StudyTime": series.study_time, "AccessionNumber": series.accession_number,
            "StudyDescription": series.study_description, "StudyID": series.study_id,
            "ReferringPhysicianName": series.referring_physician_name}


def _series_attributes(series, shift):
    date, time = _local_date_time(series.series_date, shift)
    return {**_study_attributes(series), "SeriesInstanceUID": series.series_uid,
            "SeriesNumber": series.series_number, "Modality": series.modality,
            "SeriesDescription": series.series_description,
            "SeriesDate": date, "SeriesTime": time}


def _groups(level, group, picked, domains):
    """One match per study (or patient) of ``picked``, from all its visible series."""
    if not picked:
        return []
    rows = _rows(_SERIES_ROWS.where(group.in_(picked), Series.domain.in_(domains))
                 .order_by(Series.study_uid, Series.series_uid))
    by_group = {}
    for row in rows:
        by_group.setdefault(getattr(row, group.key), []).append(row)
    matches = []
    for value in picked:
        members = by_group.get(value, [])
        if not members:
            continue
        instances = sum(r.instance_count for r in members)
        if level == "STUDY":
            match = _study_attributes(members[0])
            match["ModalitiesInStudy"] = sorted({r.modality for r in members})
            match["NumberOfStudyRelatedSeries"] = len(members)
            match["NumberOfStudyRelatedInstances"] = instances
        else:
            first = _study_attributes(members[0])
            match = {k: first[k] for k in PATIENT_KEYS}
            match["NumberOfPatientRelatedStudies"] = len({r.study_uid for r in members})
            match["NumberOfPatientRelatedSeries"] = len(members)
            match["NumberOfPatientRelatedInstances"] = instances
        matches.append(match)
    return matches


def _images(series_query, instance_conditions, limit, offset):
    rows = _rows(
        sa.select(*_SERIES_COLUMNS, *_INSTANCE_COLUMNS).select_from(Instance)
        .join(Series, Series.series_uid == Instance.series_uid)
        .where(Instance.series_uid.in_(series_query.scalar_subquery()), *instance_conditions)
        .order_by(Series.study_uid, Series.series_uid, Instance.instance_number)
        .limit(limit).offset(offset))
    shift = timedelta(minutes=default_offset())
    return [{**_series_attributes(row, shift), "SOPInstanceUID": row.sop_instance_uid,
             "SOPClassUID": row.sop_class_uid, "InstanceNumber": row.instance_number,
             "NumberOfFrames": row.number_of_frames, "Rows": row.rows,
             "Columns": row.columns, "TransferSyntaxUID": row.transfer_syntax_uid}
            for row in rows]


def instance_files(domains, study_uid=None, series_uid=None, sop_instance_uid=None):
    """(Instance row, local file path) of every stored instance of the visible series that
    the given UIDs select, ordered by study, series and instance number. On an object
    store the files are fetched into the host cache a window ahead, in parallel."""
    query = (sa.select(Instance).join(Series, Series.series_uid == Instance.series_uid)
             .where(Series.domain.in_(domains)))
    if study_uid is not None:
        query = query.where(Series.study_uid == study_uid)
    if series_uid is not None:
        query = query.where(Instance.series_uid == series_uid)
    if sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_instance_uid)
    query = query.order_by(Series.study_uid, Instance.series_uid, Instance.instance_number)
    rows = db.session.execute(query).scalars().all()
    store = storage.store()
    keys = [storage.instance_key(row.series_uid, row.instance_number) for row in rows]
    for i, (instance, key) in enumerate(zip(rows, keys)):
        if i % FETCH_WINDOW == 0:  # keep one window in flight ahead of the reader
            store.prefetch(keys[i + FETCH_WINDOW if i else 0:i + 2 * FETCH_WINDOW])
        yield instance, store.fetch(key)
