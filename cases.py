"""Clinical cases of CIRCUS DB: creation, append-only revisions, tags, deletion, search.

A case row (``ClinicalCase``) keeps a copy of its latest revision and the number of its
revisions; the revisions themselves are immutable ``CaseRevision`` rows indexed 0, 1, ...
``CaseTag`` mirrors ``ClinicalCase.tags`` and ``CaseSeries`` records every series any
revision has referenced. ``first_series_uid`` (first series of the latest revision) is where
the patient information shown in case searches comes from (quirk 20 fixed).

Appending is race-free: the revision index is claimed by one atomic UPDATE of the case row
(conditional on the count named by If-Match when the client sends one, else 412).
"""
import functools
import logging
from types import MappingProxyType

import sqlalchemy as sa

import blobs
import my_lists
from auth import (personal_info_project_ids, readable_project_ids, require_cases_writable,
                  require_project_role, require_series_domain)
from errors import ApiError, get_or_404, not_found
from models import (CaseRevision, CaseSeries, CaseTag, ClinicalCase, MyListItem, Project,
                    Series, db, iso, new_ulid, utcnow)
from search import ArrayField, SearchSpec
from series import check_pvd_range, get_series, parse_ranges, resolve_pvd, validate_pvd

log = logging.getLogger(__name__)

MAX_TAG_LENGTH = 32
MAX_BULK_CASES = 1000
MAX_BULK_TAGS = 10


class RevisionConflict(ApiError):
    """Raised when If-Match names a revision that is no longer the latest one."""

    def __init__(self):
        super().__init__(412, "The case has been modified since the given revision "
                              "(another revision was saved meanwhile).")


# --- look-up and serialisation -----------------------------------------------------------

def get_case(case_id):
    """The case, else 404 ``The requested clinicalCase was not found.``"""
    return get_or_404(ClinicalCase, case_id, "clinicalCase")


def etag(case):
    """The entity tag naming the latest revision of a case (``rev-<index>``)."""
    return f"rev-{case.revision_count - 1}"


def revisions(case):
    """Every revision of a case, oldest first."""
    return list(db.session.execute(
        db.select(CaseRevision.data).where(CaseRevision.case_id == case.case_id)
        .order_by(CaseRevision.revision_index)).scalars())


def case_document(case):
    """GET /cases/<id>: the case with all revisions and without latestRevision."""
    return {"caseId": case.case_id, "projectId": case.project_id, "tags": list(case.tags),
            "revisions": revisions(case), "domains": list(case.domains), **case.timestamps()}


def _summary(case, patient_info=None):
    """A search item from a case entity or a row of ``readable_cases``."""
    doc = {"caseId": case.case_id, "projectId": case.project_id, "tags": list(case.tags),
           "latestRevision": case.latest_revision, "domains": list(case.domains)}
    if patient_info is not None:
        doc["patientInfo"] = patient_info
    doc["createdAt"] = iso(case.created_at)
    doc["updatedAt"] = iso(case.updated_at)
    return doc


# --- validation helpers -----------------------------------------------------------------

def check_tag_lengths(tags, message="Tag length is too large"):
    if any(len(tag) > MAX_TAG_LENGTH for tag in tags):
        raise ApiError(400, message)


def _set_tags(case_id, tags):
    """Mirror a case's tags into CaseTag (the caller commits)."""
    db.session.execute(sa.delete(CaseTag).where(CaseTag.case_id == case_id))
    distinct = list(dict.fromkeys(tags))
    if distinct:
        db.session.execute(sa.insert(CaseTag), [{"case_id": case_id, "tag": t} for t in distinct])


def _add_case_series(case_id, series_uids):
    """Record series referenced by a revision (the caller commits)."""
    wanted = list(dict.fromkeys(series_uids))
    if not wanted:
        return
    known = set(db.session.execute(db.select(CaseSeries.series_uid).where(
        CaseSeries.case_id == case_id, CaseSeries.series_uid.in_(wanted))).scalars())
    rows = [{"case_id": case_id, "series_uid": uid} for uid in wanted if uid not in known]
    if rows:
        db.session.execute(sa.insert(CaseSeries), rows)


def _lock_series(uids):
    """The series rows, locked against deletion where the database can lock rows."""
    rows = db.session.execute(db.select(Series).where(Series.series_uid.in_(uids))
                              .with_for_update()).scalars()
    return {s.series_uid: s for s in rows}


# --- creation ----------------------------------------------------------------------------

def create_case(user_email, privileges, project_id, series_entries, tags):
    """Create a case with its first revision; return the new case ID.

    Checks run in CIRCUS's order (3.3): project (404), ``"auto"`` descriptors (404 for an
    unknown series), write role (401), every descriptor (400), then each series in turn
    (400 nonexistent, 400 invalid range, 403 outside the caller's domains) and one shared
    domain (400).

    Parameters
    ----------
    user_email : str
        The creator.
    privileges : auth.Privileges
        The creator's privileges.
    project_id : str
    series_entries : list of dict
        ``{"seriesUid", "partialVolumeDescriptor"}``; the descriptor may be ``"auto"``.
    tags : list of str
    """
    project = db.session.get(Project, project_id)
    if project is None:
        raise not_found("project")
    entries = [{"seriesUid": e["seriesUid"],
                "partialVolumeDescriptor": resolve_pvd(
                    e["seriesUid"], e["partialVolumeDescriptor"])} for e in series_entries]
    require_project_role(project.project_id, "write", privileges=privileges)
    for entry in entries:
        validate_pvd(entry["partialVolumeDescriptor"])
    check_tag_lengths(tags)
    found = _lock_series([e["seriesUid"] for e in entries])
    for entry in entries:
        series = found.get(entry["seriesUid"])
        if series is None:
            raise ApiError(400, "Nonexistent series.")
        check_pvd_range(series, entry["partialVolumeDescriptor"])
        require_series_domain(series, privileges)
    domains = list(dict.fromkeys(found[e["seriesUid"]].domain for e in entries))
    if len(domains) > 1:
        raise ApiError(400, "All series must belong to the same domain.")

    now = utcnow()
    revision = {"creator": user_email, "date": iso(now), "description": "Created new case.",
                "attributes": {}, "status": "draft",
                "series": [{"seriesUid": e["seriesUid"],
                            "partialVolumeDescriptor": e["partialVolumeDescriptor"],
                            "labels": []} for e in entries]}
    case = ClinicalCase(case_id=new_ulid(), project_id=project.project_id, tags=list(tags),
                        latest_revision=revision, revision_count=1, domains=domains,
                        first_series_uid=entries[0]["seriesUid"], created_at=now, updated_at=now)
    db.session.add(case)
    db.session.flush()
    db.session.add(CaseRevision(case_id=case.case_id, revision_index=0, data=revision))
    _set_tags(case.case_id, tags)
    _add_case_series(case.case_id, [e["seriesUid"] for e in entries])
    # Inside the write transaction now: a series deleted since it was read is seen here.
    still = db.session.execute(db.select(sa.func.count()).where(
        Series.series_uid.in_(list(found)))).scalar_one()
    if still != len(found):
        db.session.rollback()
        raise ApiError(400, "Nonexistent series.")
    db.session.commit()
    return case.case_id


def find_project(id_or_name):
    """The project with this ID, else the oldest one with this name, else 404."""
    project = db.session.get(Project, id_or_name) or db.session.execute(
        db.select(Project).where(Project.project_name == id_or_name)
        .order_by(Project.created_at).limit(1)).scalar_one_or_none()
    if project is None:
        raise not_found("project")
    return project


def series_entry_from_text(text):
    """``UID`` or ``UID:start:end:delta`` (the CLI's form) as a case series entry.

    Without a descriptor, the first contiguous run of stored images with delta 1 is used
    (404 for an unknown series); a malformed descriptor gives 400.
    """
    uid, *numbers = text.split(":")
    if not numbers:
        ranges = parse_ranges(get_series(uid).images)
        if not ranges:
            raise ApiError(400, "Specified range is invalid.")
        return {"seriesUid": uid,
                "partialVolumeDescriptor": {"start": ranges[0][0], "end": ranges[0][1],
                                            "delta": 1}}
    try:
        start, end, delta = (int(n) for n in numbers)
    except ValueError:
        raise ApiError(400, f"Invalid partial volume descriptor: {':'.join(numbers)}") from None
    return {"seriesUid": uid, "partialVolumeDescriptor": {"start": start, "end": end,
                                                          "delta": delta}}


# --- revisions ---------------------------------------------------------------------------

def _voxel_hashes(revision):
    return [label["data"]["voxels"] for entry in revision["series"]
            for label in entry["labels"]
            if label["type"] == "voxel" and label["data"].get("voxels") is not None]


def check_revision(revision):
    """CIRCUS's checks of a revision body after its schema (400 with CIRCUS's messages)."""
    if "date" in revision:
        raise ApiError(400, "You cannot specify revision date.")
    if "creator" in revision:
        raise ApiError(400, "You cannot specify revision creator.")
    for entry in revision["series"]:
        if "partialVolumeDescriptor" in entry:
            validate_pvd(entry["partialVolumeDescriptor"])
    absent = blobs.missing(_voxel_hashes(revision))
    if absent:
        raise ApiError(400, f"Some voxel data are missing ({', '.join(absent)}). "
                            "Store them first.")


def append_revision(case_id, user_email, revision, if_match=None):
    """Append a revision to a case (date and creator set here); return the new ETag.

    The revision index comes from one atomic ``UPDATE ... SET revision_count =
    revision_count + 1 ... RETURNING`` on the case row: concurrent writers are serialised by
    the row (PostgreSQL) or database (SQLite) write lock, so none is lost; the unique
    (case_id, revision_index) constraint is the backstop.

    Parameters
    ----------
    case_id : str
    user_email : str
        The creator.
    revision : dict
        A schema-valid revision body (description, attributes, status, series).
    if_match : werkzeug.datastructures.ETags, optional
        When given, the revision is saved only if it names the latest revision, else
        RevisionConflict (412). Without it, the revision is appended whatever came before.
    """
    check_revision(revision)
    condition = [ClinicalCase.case_id == case_id]
    if if_match is not None:
        current = db.session.execute(
            db.select(ClinicalCase.revision_count).where(ClinicalCase.case_id == case_id)
        ).scalar_one_or_none()
        if current is None:
            raise not_found("clinicalCase")
        if not if_match.contains(f"rev-{current - 1}"):
            raise RevisionConflict()
        # Another revision saved between this read and the UPDATE makes the UPDATE miss.
        condition.append(ClinicalCase.revision_count == current)
    now = utcnow()
    series = revision["series"]
    data = {"creator": user_email, "date": iso(now), "description": revision["description"],
            "attributes": revision["attributes"], "status": revision["status"],
            "series": series}
    count = db.session.execute(
        sa.update(ClinicalCase).where(*condition)
        .values(revision_count=ClinicalCase.revision_count + 1, latest_revision=data,
                updated_at=now, first_series_uid=series[0]["seriesUid"] if series else None)
        .returning(ClinicalCase.revision_count)
        .execution_options(synchronize_session=False)).scalar_one_or_none()
    if count is None:
        db.session.rollback()
        if if_match is not None and db.session.get(ClinicalCase, case_id) is not None:
            raise RevisionConflict()
        raise not_found("clinicalCase")
    db.session.add(CaseRevision(case_id=case_id, revision_index=count - 1, data=data))
    _add_case_series(case_id, [s["seriesUid"] for s in series])
    db.session.commit()
    return f"rev-{count - 1}"


# --- tags --------------------------------------------------------------------------------

def _lock_cases(case_ids):
    """Lock case rows for a read-modify-write (a row lock on PostgreSQL, the write lock on
    SQLite) with a no-op UPDATE; return how many of them exist."""
    return db.session.execute(
        sa.update(ClinicalCase).where(ClinicalCase.case_id.in_(case_ids))
        .values(revision_count=ClinicalCase.revision_count,
                updated_at=ClinicalCase.updated_at)  # keeps onupdate from firing
        .execution_options(synchronize_session=False)).rowcount


def put_tags(case, tags):
    """Replace the tags of a case; bumps updatedAt."""
    check_tag_lengths(tags)
    case.tags = list(tags)
    case.updated_at = utcnow()
    db.session.flush()  # the case row first: concurrent writers queue on it
    _set_tags(case.case_id, tags)
    db.session.commit()


def bulk_tags(privileges, operation, tags, case_ids):
    """Add, remove or set tags on many cases at once; updatedAt is left alone (3.3)."""
    if len(case_ids) > MAX_BULK_CASES:
        raise ApiError(400, "Too many case IDs")
    if len(tags) > MAX_BULK_TAGS:
        raise ApiError(400, "Too many tags.")
    if operation != "set" and not tags:
        raise ApiError(400, "You must specify at least one tag.")
    check_tag_lengths(tags, "The specified tag is too long.")
    ids = list(dict.fromkeys(case_ids))
    # Locked before they are read, so that concurrent additions cannot lose each other.
    if _lock_cases(ids) != len(ids):
        db.session.rollback()
        raise ApiError(404, "Some case does not exist")
    rows = db.session.execute(db.select(ClinicalCase.case_id, ClinicalCase.project_id,
                                        ClinicalCase.tags, ClinicalCase.updated_at)
                              .where(ClinicalCase.case_id.in_(ids))).all()
    try:
        require_cases_writable({r.project_id for r in rows}, privileges)
    except ApiError:
        db.session.rollback()
        raise
    updates = []
    for row in rows:
        old = list(row.tags or [])
        if operation == "add":
            new = old + [t for t in dict.fromkeys(tags) if t not in old]
        elif operation == "remove":
            new = [t for t in old if t not in tags]
        else:
            new = list(tags)
        # updated_at is written back as read so that its onupdate default does not fire.
        updates.append({"case_id": row.case_id, "tags": new, "updated_at": row.updated_at})
    db.session.execute(sa.update(ClinicalCase), updates)
    db.session.execute(sa.delete(CaseTag).where(CaseTag.case_id.in_(ids)))
    tag_rows = [{"case_id": u["case_id"], "tag": t}
                for u in updates for t in dict.fromkeys(u["tags"])]
    if tag_rows:
        db.session.execute(sa.insert(CaseTag), tag_rows)
    db.session.commit()


# --- deletion ----------------------------------------------------------------------------

def delete_case(case, force=False):
    """Delete a case and its revisions; with ``force`` it leaves every my list first.

    Without ``force`` a case held by any my list is refused (403), as in CIRCUS.
    Blobs and series are left alone.
    """
    case_id = case.case_id
    if force:
        my_lists.remove_resource_everywhere("clinicalCases", case_id)
    elif my_lists.in_any_list("clinicalCases", case_id):
        raise ApiError(403, "This case is in someone's my list.")
    for table in (CaseRevision, CaseTag, CaseSeries):
        db.session.execute(sa.delete(table).where(table.case_id == case_id))
    db.session.execute(sa.delete(ClinicalCase).where(ClinicalCase.case_id == case_id)
                       .execution_options(synchronize_session=False))
    db.session.commit()


# --- search ------------------------------------------------------------------------------
# Searches use table columns (SQLAlchemy Core): the ORM adds nothing to read-only rows here
# and would double the per-statement cost of the busiest list of CIRCUS DB.
_CASES = ClinicalCase.__table__.c
_TAGS = CaseTag.__table__.c
_SERIES = Series.__table__.c
_ITEMS = MyListItem.__table__.c
# Case totals depend on the cases, their tags and (filters on patientInfo) their series.
_COUNTED = ("clinical_cases", "case_tags", "series")
_PATIENT_COLUMNS = {"patientId": _SERIES.patient_id, "patientName": _SERIES.patient_name,
                    "age": _SERIES.patient_age, "sex": _SERIES.patient_sex}


def _masked_by_role(column, viewable_projects):
    """A value of the first series of the latest revision, NULL where the project's roles
    mask patient information (a correlated subquery: searches not using it never read the
    series table). ``viewable_projects`` None means every readable project."""
    value = (sa.select(column).where(_SERIES.series_uid == _CASES.first_series_uid)
             .scalar_subquery())
    if viewable_projects is None:
        return value
    return sa.case((_CASES.project_id.in_(viewable_projects), value), else_=sa.null())


def _viewable(privileges):
    """The projects whose patient information the caller's roles show, or None when that
    is every project the caller can read (the usual case: no CASE needed in the SQL)."""
    viewable = personal_info_project_ids(privileges)
    if set(viewable) >= set(readable_project_ids(privileges)):
        return None
    return tuple(sorted(viewable))


def search_spec(privileges, in_my_list=False):
    """The case search for this caller (``in_my_list``: of a my list, see ``in_list``)."""
    return _search_spec(_viewable(privileges), in_my_list)


@functools.lru_cache(maxsize=256)
def _search_spec(viewable, in_my_list):
    fields = _search_fields(viewable)
    if in_my_list:
        return SearchSpec(fields, summary, {"addedToListAt": -1}, count_tables=_COUNTED,
                          sort_fields={**fields, "addedToListAt": _ITEMS.created_at})
    return SearchSpec(fields, summary, {"createdAt": -1}, count_tables=_COUNTED)


@functools.lru_cache(maxsize=256)
def _search_fields(viewable):
    """The filter/sort fields of case searches (API 1.8) for a set of viewable projects;
    patientInfo.* fields are evaluated against the value masked by project role (2.6)."""
    # SQL expressions are immutable: built once per set of viewable projects, they also
    # keep SQLAlchemy's compiled-statement cache warm.
    fields = {"projectId": _CASES.project_id, "caseId": _CASES.case_id}
    for key, column in _PATIENT_COLUMNS.items():
        fields["patientInfo." + key] = _masked_by_role(
            column, None if viewable is None else list(viewable))
    fields["tags"] = ArrayField(_TAGS.tag, _TAGS.case_id == _CASES.case_id)
    fields["createdAt"] = _CASES.created_at
    fields["updatedAt"] = _CASES.updated_at
    return MappingProxyType(fields)


@functools.lru_cache(maxsize=256)
def _summary_columns(viewable, show_personal_info):
    if not show_personal_info or viewable == ():
        patient_info = sa.null()
    else:
        patient_info = _masked_by_role(_SERIES.patient_info,
                                       None if viewable is None else list(viewable))
    return (_CASES.case_id, _CASES.project_id, _CASES.tags, _CASES.latest_revision,
            _CASES.domains, _CASES.created_at, _CASES.updated_at,
            patient_info.label("patient_info"))


def search_key(privileges, show_personal_info):
    """Every input of a caller's case search statements (``readable_cases`` and
    ``search_spec``): equal keys give equal statements, so they may be reused."""
    return (_viewable(privileges), bool(show_personal_info),
            tuple(readable_project_ids(privileges)))


def readable_cases(privileges, show_personal_info):
    """Rows of the cases whose project grants the caller ``read``, each with the
    ``patient_info`` the caller may see (2.6) or NULL.

    ``show_personal_info`` is the caller's global privilege and preference together; the
    project must also grant ``read`` and ``viewPersonalInfo``.
    """
    return readable_cases_of(search_key(privileges, show_personal_info))


def readable_cases_of(key):
    """``readable_cases`` from a ``search_key``; one bound parameter per project, so a
    reused statement runs without re-rendering an expanding IN."""
    viewable, show_personal_info, readable = key
    return sa.select(*_summary_columns(viewable, show_personal_info)).where(
        _CASES.project_id.in_([sa.bindparam(None, pid) for pid in readable]))


def in_list(query, my_list_id):
    """Restrict a case query to the items of a my list (``search_spec(..., in_my_list=True)``
    sorts on addedToListAt)."""
    return query.join(MyListItem.__table__, sa.and_(_ITEMS.my_list_id == my_list_id,
                                                     _ITEMS.resource_id == _CASES.case_id))


def summary(row):
    """A search item from a row of ``readable_cases``."""
    return _summary(row, row.patient_info)
