"""Server parameters: /api/admin/server-params."""
from flask import Blueprint, jsonify

import admin_records
from validation import expects

bp = Blueprint("admin_server_params", __name__, url_prefix="/server-params")
ANY_JSON_DOCUMENT = {"type": ["object", "array"]}  # strict JSON: no bare scalars (quirk 27)


@bp.get("")
def list_server_params():
    """Every server parameter as one object."""
    return admin_records.all_server_params()


@bp.get("/<key>")
def get_server_param(key):
    """The raw value of one server parameter."""
    return jsonify(admin_records.get_server_param(key))


@bp.put("/<key>")
@expects(ANY_JSON_DOCUMENT)
def put_server_param(key, body):
    """Create or replace one server parameter (the body is its value)."""
    admin_records.put_server_params({key: body})
    return "", 204


@bp.put("")
@expects("server-params")
def put_server_params(body):
    """Create or replace each parameter of the body; others stay."""
    admin_records.put_server_params(body)
    return "", 204
