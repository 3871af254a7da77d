"""Plug-in definitions: /api/admin/plugins."""
from flask import Blueprint

bp = Blueprint("admin_plugins", __name__, url_prefix="/api/admin/plugins")
