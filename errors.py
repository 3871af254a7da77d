"""ApiError, get_or_404 and the handlers that turn every failure into CIRCUS's JSON error body."""
import logging
from http import HTTPStatus

from flask import current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from models import db

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as ``{"error": message, **extra}`` with the given HTTP status."""

    def __init__(self, status, message=None, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def not_found(schema):
    """The generic "not found" error of a record looked up by its key."""
    return ApiError(404, f"The requested {schema} was not found.")


def get_or_404(model, key, schema):
    """The row of ``model`` with primary key ``key``, else ApiError 404 as CIRCUS words it
    (``The requested <schema> was not found.``)."""
    row = db.session.get(model, key) if isinstance(key, (str, int)) else None
    if row is None:
        raise not_found(schema)
    return row


def error_response(status, message, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def register_error_handlers(app):
    """Install the JSON handlers for ApiError, HTTP errors and unexpected exceptions."""

    @app.errorhandler(ApiError)
    def handle_api_error(error):
        message = error.message
        if message is None:
            message = HTTPStatus(error.status).phrase
        return error_response(error.status, message, **error.extra)

    @app.errorhandler(HTTPException)
    def handle_http_error(error):
        if error.code == 404 and request.url_rule is None:
            return error_response(404, "Not found")
        if error.code == 413:
            return error_response(413, "request entity too large")
        return error_response(error.code, error.name)

    @app.errorhandler(Exception)
    def handle_unexpected(error):
        # Never leak a stack trace or secrets; the log keeps the details.
        log.exception("Unexpected error on %s %s", request.method, request.path)
        db.session.rollback()
        return error_response(500, "Internal server error.")
