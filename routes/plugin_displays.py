"""Plug-in display bundles: /api/plugin-displays."""
from flask import Blueprint

bp = Blueprint("plugin_displays", __name__, url_prefix="/api/plugin-displays")
