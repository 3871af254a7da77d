"""DICOMweb (PS3.18): QIDO-RS, WADO-RS and STOW-RS under /dicom-web.

The same bearer tokens as /api (the auth hook); every answer is limited to the caller's
domains. Domain rules and formats live in ``dicom.web``; privileges in ``auth``.
"""
import orjson
from flask import Blueprint, Response, current_app, request

import audit
from auth import (can_view_personal_info, readable_domains, require_personal_info_view,
                  require_upload_domain)
from dicom import web
from errors import error_response
from table_versions import app_memo

bp = Blueprint("dicomweb", __name__, url_prefix="/dicom-web")

DICOM_JSON = "application/dicom+json"
_STUDY = "/studies/<study>"
_SERIES = _STUDY + "/series/<series>"
_INSTANCE = _SERIES + "/instances/<instance>"


@bp.errorhandler(web.DicomWebError)
def handle_dicomweb_error(error):
    return error_response(error.status, error.message)


def _base_url():
    return request.host_url.rstrip("/") + bp.url_prefix


def _json(value, status=200, headers=None):
    return Response(orjson.dumps(value), status=status, mimetype=DICOM_JSON, headers=headers)


# The UID that names each match of a search, by resource (for the audit trail).
_UID_TAGS = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}


def _search(resource, study=None, series=None):
    web.negotiate_json(request.headers.get("Accept"))
    personal = can_view_personal_info()
    result = web.search(resource, request.args, readable_domains(), personal,
                        _base_url(), study_uid=study, series_uid=series)
    if personal and result.matches:  # an answer with patient information is audited
        tag = _UID_TAGS[resource]
        audit.record("dicomweb-search", resource, None, detail={"uids": [
            (match.get(tag) or {}).get("Value", [None])[0] for match in result.matches]})
    return _json(result.matches, headers={"Warning": result.warning} if result.warning else None)


def _audit_retrieve(action, files, study, series, instance):
    """A WADO-RS answer carrying DICOM data or pixels: who took which instances."""
    target = ("instance", instance) if instance else ("series", series) if series else \
        ("study", study)
    audit.record(action, *target, detail={"instances": len(files)})


def _multipart(parts, part_type):
    boundary = web.new_boundary()
    return Response(web.multipart(parts, boundary),
                    content_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


def _retrieve(study, series=None, instance=None):
    syntax = web.negotiate_multipart(request.headers.get("Accept"), "application/dicom")
    files = web.find_files(readable_domains(), study, series, instance)
    require_personal_info_view()
    _audit_retrieve("wado", files, study, series, instance)
    return _multipart(web.instance_parts(files, syntax), "application/dicom")


def _metadata(study, series=None, instance=None):
    web.negotiate_json(request.headers.get("Accept"))
    files = web.find_files(readable_domains(), study, series, instance)
    memo = app_memo("dicomweb.metadata", web.METADATA_MEMO_SIZE)
    personal = can_view_personal_info()
    if personal:
        _audit_retrieve("wado-metadata", files, study, series, instance)
    return Response(web.metadata_stream(files, personal, memo), mimetype=DICOM_JSON)


def _render(files, frame=1, thumbnail=False):
    media_type = web.negotiate_image(request.headers.get("Accept"))
    window = web.parse_window(request.args.get("window"))
    default = (web.THUMBNAIL_SIZE, web.THUMBNAIL_SIZE) if thumbnail else None
    viewport = web.parse_viewport(request.args.get("viewport"), default)
    return Response(web.render_png(files[len(files) // 2], frame, window, viewport),
                    mimetype=media_type)


# --- QIDO-RS ----------------------------------------------------------------------------

@bp.get("/studies")
def search_studies():
    """QIDO-RS: search the studies of the caller's domains."""
    return _search("studies")


@bp.get("/series")
def search_series():
    """QIDO-RS: search the series of the caller's domains."""
    return _search("series")


@bp.get("/instances")
def search_instances():
    """QIDO-RS: search the instances of the caller's domains."""
    return _search("instances")


@bp.get(_STUDY + "/series")
def search_study_series(study):
    """QIDO-RS: search the series of a study."""
    return _search("series", study)


@bp.get(_STUDY + "/instances")
def search_study_instances(study):
    """QIDO-RS: search the instances of a study."""
    return _search("instances", study)


@bp.get(_SERIES + "/instances")
def search_series_instances(study, series):
    """QIDO-RS: search the instances of a series."""
    return _search("instances", study, series)


# --- WADO-RS ----------------------------------------------------------------------------

@bp.get(_STUDY)
def retrieve_study(study):
    """WADO-RS: a study's instances as multipart/related application/dicom (personalInfoView)."""
    return _retrieve(study)


@bp.get(_SERIES)
def retrieve_series(study, series):
    """WADO-RS: a series' instances as multipart/related application/dicom (personalInfoView)."""
    return _retrieve(study, series)


@bp.get(_INSTANCE)
def retrieve_instance(study, series, instance):
    """WADO-RS: one instance as multipart/related application/dicom (personalInfoView)."""
    return _retrieve(study, series, instance)


@bp.get(_STUDY + "/metadata")
def retrieve_study_metadata(study):
    """WADO-RS: the metadata of a study's instances (application/dicom+json)."""
    return _metadata(study)


@bp.get(_SERIES + "/metadata")
def retrieve_series_metadata(study, series):
    """WADO-RS: the metadata of a series' instances (application/dicom+json)."""
    return _metadata(study, series)


@bp.get(_INSTANCE + "/metadata")
def retrieve_instance_metadata(study, series, instance):
    """WADO-RS: the metadata of one instance (application/dicom+json)."""
    return _metadata(study, series, instance)


@bp.get(_INSTANCE + "/frames/<frames>")
def retrieve_frames(study, series, instance, frames):
    """WADO-RS: uncompressed frames as multipart/related application/octet-stream."""
    # Frames are always uncompressed; the negotiation only refuses other media types.
    web.negotiate_multipart(request.headers.get("Accept"), "application/octet-stream")
    numbers = web.parse_frame_list(frames)
    stored = web.find_files(readable_domains(), study, series, instance)[0]
    web.check_frames(stored, numbers)
    _audit_retrieve("wado-frames", [stored], study, series, instance)
    return _multipart(web.frame_parts(web.frame_bytes(stored, numbers)),
                      "application/octet-stream")


@bp.get(_INSTANCE + "/rendered")
def retrieve_rendered_instance(study, series, instance):
    """WADO-RS: an instance rendered as PNG (``window=center,width``, ``viewport=w,h``)."""
    return _render(web.find_files(readable_domains(), study, series, instance))


@bp.get(_INSTANCE + "/frames/<frames>/rendered")
def retrieve_rendered_frame(study, series, instance, frames):
    """WADO-RS: one frame rendered as PNG (``window=center,width``, ``viewport=w,h``)."""
    numbers = web.parse_frame_list(frames)
    if len(numbers) != 1:
        raise web.DicomWebError(400, "Only one frame is rendered at a time.")
    stored = web.find_files(readable_domains(), study, series, instance)
    web.check_frames(stored[0], numbers)
    return _render(stored, numbers[0])


@bp.get(_STUDY + "/thumbnail")
def retrieve_study_thumbnail(study):
    """WADO-RS: a PNG thumbnail of a study (its middle instance)."""
    return _render(web.find_files(readable_domains(), study), thumbnail=True)


@bp.get(_SERIES + "/thumbnail")
def retrieve_series_thumbnail(study, series):
    """WADO-RS: a PNG thumbnail of a series (its middle instance)."""
    return _render(web.find_files(readable_domains(), study, series), thumbnail=True)


@bp.get(_INSTANCE + "/thumbnail")
def retrieve_instance_thumbnail(study, series, instance):
    """WADO-RS: a PNG thumbnail of an instance."""
    return _render(web.find_files(readable_domains(), study, series, instance),
                   thumbnail=True)


# --- STOW-RS ----------------------------------------------------------------------------

def _store(study=None):
    boundary = web.check_stow_content_type(request.mimetype, request.mimetype_params)
    domain = web.target_domain(request.args.get("domain"))
    require_upload_domain(domain)
    result = web.store(request.stream, boundary, domain, _base_url(), study_uid=study,
                       part_max_bytes=current_app.config["UPLOAD_FILE_SIZE_MAX_BYTES"],
                       max_parts=current_app.config["ARCHIVE_MAX_ENTRIES"])
    return _json(result.to_json(_base_url()), status=result.status)


@bp.post("/studies")
def store_instances():
    """STOW-RS: store instances (multipart/related application/dicom) into ``?domain=``
    or the server's default domain."""
    return _store()


@bp.post(_STUDY)
def store_study_instances(study):
    """STOW-RS: store instances of one study (others fail with 0xC409)."""
    return _store(study)
