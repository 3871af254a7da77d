"""Voxel label blobs: /api/blob/<sha1>."""
from flask import Blueprint, request, send_file

import blobs
from errors import ApiError
from validation import content_type

bp = Blueprint("blobs", __name__, url_prefix="/api/blob")


@bp.get("/<sha1>")
def get_blob(sha1):
    """Download the blob stored under a SHA-1."""
    path = blobs.path_of(sha1)
    if path is None:
        raise ApiError(404)
    return send_file(path, mimetype="application/octet-stream", conditional=False, etag=False)


@bp.put("/<sha1>")
@content_type("application/octet-stream")
def put_blob(sha1):
    """Store a blob (optionally gzip-encoded) under its SHA-1."""
    blobs.store(sha1, request.stream, request.headers.get("Content-Encoding"))
    return "", 201
