"""DICOM series: /api/series (uploads, search, orientation, deletion, volume export)."""
import os
import re

from flask import Blueprint, g, request

import exports
import multipart_spool
import my_lists
import search
import series
import storage
import tasks
from auth import (can_view_personal_info, readable_domains, require_global, require_series_domain,
                  require_upload_domain)
from dicom import importer
from dicom.errors import DicomImportError, NotDicomError
from errors import ApiError
from models import MyListItem, Series, ServerParam, db, new_ulid
from validation import content_type, expects

bp = Blueprint("series", __name__, url_prefix="/api/series")

POSITIVE_INT_RE = re.compile(r"^[1-9]\d*$")

_DOMAINS = db.select(ServerParam.value).where(ServerParam.key == "domains")


def _series_rows():
    """Series as plain rows of their document's columns, JSON columns as their stored text
    (``Series.row_to_json(..., as_text=True)``): lists only read them, rows cost less
    than objects, and stored JSON passed on costs less than decoded and encoded again."""
    return db.select(*Series.document_columns(as_text=True))


def _in_domains(domains):
    """``domain IN (...)`` with one parameter per domain: a memoized statement then runs
    without re-rendering its SQL, as an expanding IN would each time."""
    return Series.domain.in_([db.bindparam(None, domain) for domain in domains])


def _check_upload_domain(domain):
    """400 for a domain the server does not know, 403 for one the caller lacks."""
    # The Core connection, not the ORM session: a plain select needs none of its work.
    value = db.session.connection().execute(_DOMAINS).scalar()
    known = value if isinstance(value, list) else []
    if domain not in known:
        raise ApiError(400, f'The domain "{domain}" does not exist.')
    require_upload_domain(domain)


# --- views ------------------------------------------------------------------------------

@bp.get("")
def list_series():
    """Search the series of the caller's domains."""
    domains = tuple(readable_domains())
    return search.run(series.search_spec(can_view_personal_info()),
                      lambda: _series_rows().where(_in_domains(domains)), memo=("series", domains))


@bp.post("/domain/<domain>")
@content_type("multipart/form-data")
def upload_series(domain):
    """Upload DICOM files or zip/tar.gz archives; they are imported by a task."""
    _check_upload_domain(domain)
    task_id = new_ulid()
    spool = storage.spool_dir(task_id)
    try:
        paths = multipart_spool.spool_upload(spool)
        if not paths:
            raise ApiError(400, "No file was uploaded.")
        task = tasks.create_task(g.user.user_email, importer.TASK_NAME, kind="series_import",
                                 params={"domain": domain,
                                         "files": [os.path.basename(p) for p in paths]})
        task.task_id = task_id
        db.session.commit()
    except BaseException:
        storage.remove_tree(spool)
        raise
    return {"taskId": task_id}, 201


@bp.post("/domain/<domain>/single")
@content_type("multipart/form-data")
def upload_single(domain):
    """Import one DICOM file synchronously."""
    _check_upload_domain(domain)
    try:
        importer.import_single(domain, _spool_one)
    except NotDicomError:
        raise ApiError(400, "The file is not a DICOM file. You cannot use archived files.") from None
    except DicomImportError as exc:
        raise ApiError(exc.status, "Error while importing a DICOM file. "
                       f"This may mean the uploaded file is broken. ({exc})") from None
    return "", 201


def _spool_one(folder, prefix):
    """Spool the upload of /single straight into the import's staging ``folder``."""
    paths = multipart_spool.spool_upload(folder, prefix=prefix)
    if len(paths) != 1:
        raise ApiError(400, "Only one file is allowed.")
    return paths[0]


@bp.get("/<series_uid>")
def get_series(series_uid):
    """One series; patient information only for those allowed to see it."""
    row = series.get_series(series_uid)
    require_series_domain(row)
    return row.to_json(with_patient_info=can_view_personal_info())


def _image_number(name):
    value = request.args.get(name)
    if value is None:
        return None
    if not POSITIVE_INT_RE.match(value):
        raise ApiError(400, "Invalid string")
    return int(value)


@bp.get("/<series_uid>/orientation")
def get_orientation(series_uid):
    """Whether images start..end of a series run head-first or foot-first."""
    row = series.get_series(series_uid)
    numbers = series.parse_ranges(row.images)
    start = _image_number("start") or (numbers[0][0] if numbers else None)
    end = _image_number("end") or (numbers[-1][1] if numbers else None)
    if start is None or end is None or not (series.has_image(row.images, start)
                                            and series.has_image(row.images, end)):
        raise ApiError(400, "The given start/end number is out of bounds.")
    require_series_domain(row)
    return {"orientation": series.orientation(row, start, end)}


@bp.delete("/<series_uid>")
def delete_series(series_uid):
    """Delete a series of the caller's domains and its files (not if a case or job uses it)."""
    require_series_domain(series.get_series(series_uid))
    series.delete_series(series_uid)
    return "", 204


@bp.get("/list/<my_list_id>")
def list_series_in_my_list(my_list_id):
    """Search the series of a my list (the caller's own or a public one)."""
    my_list = my_lists.list_for_search(my_list_id, "series")
    query = (_series_rows().where(_in_domains(readable_domains()))
             .join(MyListItem, db.and_(MyListItem.my_list_id == my_list.my_list_id,
                                       MyListItem.resource_id == Series.series_uid)))
    return search.run(series.search_spec(can_view_personal_info(), in_my_list=True),
                      query)


def _may_download(**_kwargs):
    require_global("downloadVolume")


@bp.post("/export-cs-volume")
@expects("export-cs-volume", before=_may_download)
def export_cs_volume(body):
    """Export series volumes in the plug-in input format (a task with a download)."""
    return {"taskId": exports.start_cs_volume_export(g.user.user_email, g.privileges, body)}, 201
