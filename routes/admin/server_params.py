"""Server parameters: /api/admin/server-params."""
from flask import Blueprint

bp = Blueprint("admin_server_params", __name__, url_prefix="/api/admin/server-params")
