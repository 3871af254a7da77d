"""The CIRCUS web UI on the same origin: the built files of CIRCUS_WEB_UI_DIR.

Registered by create_app only when that setting is set. Every GET outside /api, /login and
/rs answers a file of the folder or, for any other path, its index.html: the UI routes in
the browser (as CIRCUS's own .htaccess does). No token is needed; the API stays behind the
auth hook because these rules never match /api.
"""
from urllib.parse import urlsplit

from flask import Blueprint, current_app, send_file
from werkzeug.routing import PathConverter

import storage
from errors import ApiError

bp = Blueprint("web_ui", __name__)
# The UI's file names carry no content hash (application.js), so a browser revalidates
# within the hour after an upgrade; index.html is revalidated every time.
FILE_MAX_AGE = 3600
# Only this origin's scripts; inline styles, which the UI's components set. A separate
# image server (DICOM_IMAGE_SERVER_URL) is added to connect-src.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'{image_server}; "
       "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; "
       "form-action 'self'")


class WebUiPath(PathConverter):
    """A path whose first segment is not api, login or rs, in any letter case (CIRCUS
    matches paths case-insensitively, so /API/status must still reach the API)."""
    regex = r"(?!(?i:api|login|rs)(?![^/]))[^/].*?"


bp.record_once(lambda state: state.app.url_map.converters.setdefault("web_ui_path", WebUiPath))


@bp.after_request
def _content_security_policy(response):
    """The policy of the UI's files (WEB_UI_CSP replaces it)."""
    policy = current_app.config.get("WEB_UI_CSP")
    if not policy:
        url = current_app.config.get("DICOM_IMAGE_SERVER_URL")
        origin = ""
        if url:
            parts = urlsplit(url)
            ws = "wss" if parts.scheme == "https" else "ws"
            origin = f" {parts.scheme}://{parts.netloc} {ws}://{parts.netloc}"
        policy = CSP.format(image_server=origin)
    response.headers["Content-Security-Policy"] = policy
    return response


@bp.get("/", defaults={"path": ""})
@bp.get("/<web_ui_path:path>")
def get_web_ui(path):
    """A file of the web UI, else its index.html."""
    try:
        full = storage.web_ui_file(path) if path else None
    except storage.UnsafePathError:
        raise ApiError(404, "Not found") from None
    if full is not None:
        return send_file(full, max_age=FILE_MAX_AGE)
    response = send_file(storage.web_ui_file("index.html"), max_age=0)
    response.cache_control.no_cache = True
    return response
