"""The image server: /rs/series/<uid>/metadata and /volume, the /rs/ws/volume WebSocket.

``metadata`` answers without a token (the web UI sends none); a token given by bearer
header or ``?token=`` is checked with the series' domain. ``volume`` and ``scan`` (a
multiplanar reformat, ``dicom.reformat``) need one. The socket checks its ``?token=`` on
every BEGIN_TRANSFER.
"""
import logging
import re

import numpy as np
from flask import Blueprint, Response, request, stream_with_context
from flask_sock import Sock
from isal import isal_zlib

import auth
import storage
from dicom import reformat, rs_metadata, transfer, volume_cache, volumes
from errors import ApiError
from models import Series, db
from series import ImagesStringError, is_valid_pvd, pvd_images

log = logging.getLogger(__name__)

bp = Blueprint("rs", __name__, url_prefix="/rs")
sock = Sock()

INT_RE = re.compile(r"^[+-]?\d+$")
MAX_UID_LENGTH = 64
DECODE_AHEAD = 4  # slices queued for decoding ahead of the one being streamed
# Content-Encoding -> isal_zlib wbits (gzip container, zlib container for "deflate")
ENCODINGS = {"gzip": 16 + 15, "deflate": 15}
COMPRESSION_LEVEL = 1  # the fastest: volumes are streamed as they are decoded


def _valid_uid(series_uid):
    return len(series_uid) <= MAX_UID_LENGTH and storage.UID_RE.match(series_uid) is not None


def _pvd_numbers():
    """The image numbers of ``?start&end&delta`` (None without them); 400 when invalid."""
    raw = {key: request.args.get(key) for key in ("start", "end", "delta")}
    errors = [f"{key} is invalid." for key, value in raw.items()
              if value is not None and not INT_RE.match(value)]
    if errors:
        raise ApiError(400, "\n".join(errors))
    if all(value is None for value in raw.values()):
        return None
    pvd = {key: None if value is None else int(value) for key, value in raw.items()}
    if not is_valid_pvd(pvd):
        raise ApiError(400, "Volume descriptor is invalid")
    return pvd_images(pvd)


def _open(series_uid, token_required):
    """(volume, zs) of the request's series and descriptor, its first slice decoded."""
    numbers = _pvd_numbers()
    if not _valid_uid(series_uid):
        raise ApiError(400, "Invalid series UID")
    token = auth.rs_request_token()
    if token is None and token_required:
        raise ApiError(401, "Unauthorized request: no authentication given")
    series = db.session.get(Series, series_uid)
    if series is None or not series.images:
        raise ApiError(404, "Series could not be loaded")
    if token is not None:
        auth.check_series_token(token, series.domain)
    try:
        volume, zs = volume_cache.open_volume(series, numbers)
    except ImagesStringError:
        raise ApiError(404, "Series could not be loaded") from None
    if zs is None:
        raise ApiError(400, "Volume descriptor is invalid")
    try:
        volume.get(min(zs), transfer.DECODE_TIMEOUT)
    except volumes.VolumeError as exc:
        log.warning("Series %s could not be loaded: %s", series_uid, exc)
        raise ApiError(404, "Series could not be loaded") from None
    return volume, zs


@bp.get("/series/<series_uid>/metadata")
def get_metadata(series_uid):
    """Geometry, pixel format, windows and mode of a series or a partial volume of it."""
    volume, zs = _open(series_uid, token_required=False)
    estimate = request.args.get("estimateWindow", "none")
    if estimate not in rs_metadata.ESTIMATES:
        raise ApiError(400, "estimateWindow is invalid.")
    try:
        return rs_metadata.metadata(volume, zs, estimate)
    except volumes.VolumeError as exc:
        log.warning("Metadata of %s failed: %s", series_uid, exc)
        raise ApiError(404, "Series could not be loaded") from None


@bp.get("/series/<series_uid>/volume")
def get_volume(series_uid):
    """Every slice of the series or partial volume, little-endian, gzip/deflate if accepted."""
    volume, zs = _open(series_uid, token_required=True)
    encoding = request.accept_encodings.best_match(list(ENCODINGS))
    response = Response(stream_with_context(_volume_body(volume, zs, encoding)),
                        mimetype="application/octet-stream")
    response.headers["Vary"] = "Accept-Encoding"
    if encoding:
        response.headers["Content-Encoding"] = encoding
    else:
        response.content_length = volume.data.shape[1] * len(zs)
    return response


@bp.get("/series/<series_uid>/scan")
def get_scan(series_uid):
    """A multiplanar reformatted image: raw pixels, or 8-bit windowed (PNG with `format=png`)."""
    try:
        scan_request = reformat.parse_scan_query(request.args)
    except reformat.ScanQueryError as exc:
        raise ApiError(400, str(exc)) from None
    volume, zs = _open(series_uid, token_required=True)
    volume.request(zs)
    first = volume.first
    try:
        shape = (first.rows, first.columns) + ((4,) if first.pixel_format == "rgba8" else ())
        voxels = np.stack([volume.pixels(z, transfer.DECODE_TIMEOUT).reshape(shape) for z in zs])
        image = reformat.scan(voxels, scan_request)
    except reformat.ScanError as exc:
        raise ApiError(400, str(exc)) from None
    except volumes.VolumeError as exc:
        log.warning("Scan of %s failed: %s", series_uid, exc)
        raise ApiError(404, "Series could not be loaded") from None
    body = reformat.encode_png(image) if scan_request.format == "png" else image.tobytes()
    return Response(body, mimetype=scan_request.media_type)


def _volume_body(volume, zs, encoding):
    """The slices one by one (compressed on the fly): memory stays one slice deep."""
    compressor = isal_zlib.compressobj(COMPRESSION_LEVEL, isal_zlib.DEFLATED,
                                       ENCODINGS[encoding]) if encoding else None
    for i, z in enumerate(zs):
        volume.request(zs[i:i + 1 + DECODE_AHEAD])
        try:
            row = volume.get(z, transfer.DECODE_TIMEOUT)
        except volumes.VolumeError as exc:
            # the status is sent: cutting the body short is all that is left to say it
            log.warning("Volume of %s cut short: %s", volume.series_uid, exc)
            raise
        yield compressor.compress(row) if compressor else row.tobytes()
    if compressor:
        yield compressor.flush()


def _begin_transfer(token, series_uid, pvd):
    """(volume, zs) for a BEGIN_TRANSFER the token may make, else None (nothing is sent)."""
    try:
        if not token or not _valid_uid(series_uid):
            return None
        numbers = None
        if pvd is not None:
            if not is_valid_pvd(pvd):
                return None
            numbers = pvd_images(pvd)
        series = db.session.get(Series, series_uid)
        if series is None or not series.images:
            return None
        auth.check_series_token(token, series.domain)
        volume, zs = volume_cache.open_volume(series, numbers)
        return None if zs is None else (volume, zs)
    except (ApiError, ImagesStringError):
        return None
    finally:
        # a socket lives for hours: give its database connection back between checks
        db.session.close()


@bp.before_request
def _no_socket_compression():
    """The volume socket sends raw slices uncompressed: browsers offer permessage-deflate,
    and deflating every slice in Python would cost more time than it saves on a lab's
    network (the HTTP volume offers gzip instead). Hiding the offer from the handshake
    keeps the extension off."""
    if request.endpoint == "rs.volume_socket":
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@sock.route("/ws/volume", bp=bp)
def volume_socket(ws):
    """The volume WebSocket: slices of the viewers' series, highest priority first."""
    token = request.args.get("token")
    db.session.close()  # the hook may have used the session; nothing else does until BEGIN
    transfer.serve(ws, lambda series_uid, pvd: _begin_transfer(token, series_uid, pvd))
