"""Plug-in definitions the caller may read: /api/plugins."""
from flask import Blueprint

bp = Blueprint("plugins", __name__, url_prefix="/api/plugins")
