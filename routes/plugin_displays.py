"""Plug-in display bundles: /api/plugin-displays (public: the web UI loads them as scripts)."""
from flask import Blueprint

from plugins import displays

bp = Blueprint("plugin_displays", __name__, url_prefix="/api/plugin-displays")


@bp.get("/<plugin_id>/<path:path>")
def get_display(plugin_id, path):
    """A file of a plug-in's custom display bundle (e.g. displays/remoteEntry.js)."""
    full = displays.display_file(plugin_id, path)
    with open(full, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    return text, 200, {"Content-Type": "text/javascript; charset=utf-8"}
