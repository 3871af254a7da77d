"""DICOM series: /api/series."""
import os
import re

from flask import Blueprint, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

import multipart_spool
import my_lists
import search
import series_access
import storage
import tasks
from auth import (can_view_personal_info, readable_domains, require_series_domain,
                  require_upload_domain)
from dicom import importer
from dicom.errors import DicomImportError, NotDicomError
from errors import ApiError
from models import MyListItem, Series, ServerParam, db, new_ulid
from validation import content_type

bp = Blueprint("series", __name__, url_prefix="/api/series")

FIELD_NAME = "files"
POSITIVE_INT_RE = re.compile(r"^[1-9]\d*$")
UPLOAD_BUFFER = 1024 * 1024

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


# --- multipart spooling -------------------------------------------------------------------

class _LimitedFile:
    """A spool file that refuses to grow beyond the per-file upload limit (413)."""

    def __init__(self, path, limit):
        self.path = path
        self.limit = limit
        self.size = 0
        self.fh = open(path, "w+b")

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise RequestEntityTooLarge()
        return self.fh.write(data)

    def seek(self, *args):
        return self.fh.seek(*args)

    def read(self, *args):
        return self.fh.read(*args)

    def tell(self):
        return self.fh.tell()

    def close(self):
        self.fh.close()


def _spool_upload(folder, prefix=""):
    """Stream the multipart body into ``folder``: one file per part, never in memory.

    Returns the spooled paths of the ``files`` parts in order. Any other file field, a
    malformed body or a file above UPLOAD_FILE_SIZE_MAX_BYTES is refused.
    """
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
    limit = current_app.config["UPLOAD_FILE_SIZE_MAX_BYTES"]
    opened = []

    def on_file(name):
        if name != FIELD_NAME:
            raise ApiError(400, f'Uploaded files must use the field name "{FIELD_NAME}".')
        spooled = _LimitedFile(os.path.join(folder, f"{prefix}{len(opened) + 1:06d}"), limit)
        opened.append(spooled)
        return spooled

    boundary = request.mimetype_params.get("boundary", "").encode("ascii", "replace")
    if not boundary:
        raise ApiError(400, "The multipart body could not be parsed.")
    try:
        # 1 MiB reads: werkzeug's default 64 KiB halves the throughput of large uploads.
        multipart_spool.parse(request.stream, boundary, on_file, chunk=UPLOAD_BUFFER,
                              field_max=4 * UPLOAD_BUFFER,
                              max_parts=current_app.config["ARCHIVE_MAX_ENTRIES"])
    except (RequestEntityTooLarge, multipart_spool.MultipartTooLarge):
        raise ApiError(413, "request entity too large") from None
    except multipart_spool.MultipartError:
        raise ApiError(400, "The multipart body could not be parsed.") from None
    finally:
        for spooled in opened:
            spooled.close()
    return [spooled.path for spooled in opened]


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
    return search.run(series_access.search_spec(can_view_personal_info()),
                      lambda: _series_rows().where(_in_domains(domains)), memo=("series", domains))


@bp.post("/domain/<domain>")
@content_type("multipart/form-data")
def upload_series(domain):
    """Upload DICOM files or zip/tar.gz archives; they are imported by a task."""
    _check_upload_domain(domain)
    task_id = new_ulid()
    spool = storage.spool_dir(task_id)
    try:
        paths = _spool_upload(spool)
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
    paths = _spool_upload(folder, prefix=prefix)
    if len(paths) != 1:
        raise ApiError(400, "Only one file is allowed.")
    return paths[0]


@bp.get("/<series_uid>")
def get_series(series_uid):
    """One series; patient information only for those allowed to see it."""
    series = series_access.get_series(series_uid)
    require_series_domain(series)
    return series.to_json(with_patient_info=can_view_personal_info())


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
    series = series_access.get_series(series_uid)
    numbers = series_access.parse_ranges(series.images)
    start = _image_number("start") or (numbers[0][0] if numbers else None)
    end = _image_number("end") or (numbers[-1][1] if numbers else None)
    if start is None or end is None or not (series_access.has_image(series.images, start)
                                            and series_access.has_image(series.images, end)):
        raise ApiError(400, "The given start/end number is out of bounds.")
    require_series_domain(series)
    return {"orientation": series_access.orientation(series, start, end)}


@bp.delete("/<series_uid>")
def delete_series(series_uid):
    """Delete a series of the caller's domains and its files (not if a case or job uses it)."""
    series = series_access.get_series(series_uid)
    require_series_domain(series)
    series_access.delete_series(series_uid)
    return "", 204


@bp.get("/list/<my_list_id>")
def list_series_in_my_list(my_list_id):
    """Search the series of a my list (the caller's own or a public one)."""
    my_list = my_lists.list_for_search(my_list_id, "series")
    query = (_series_rows().where(_in_domains(readable_domains()))
             .join(MyListItem, db.and_(MyListItem.my_list_id == my_list.my_list_id,
                                       MyListItem.resource_id == Series.series_uid)))
    return search.run(series_access.search_spec(can_view_personal_info(), in_my_list=True),
                      query)
