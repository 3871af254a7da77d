"""Plug-in definitions the caller may read: /api/plugins."""
from flask import Blueprint, g

from auth import require_plugin_readable
from plugins import definitions

bp = Blueprint("plugins", __name__, url_prefix="/api/plugins")


@bp.get("")
def list_plugins():
    """The plug-ins the caller holds `readPlugin` on (a plain array)."""
    return [definitions.public_json(p)
            for p in definitions.readable_plugins(g.privileges)]


@bp.get("/<plugin_id>")
def get_plugin(plugin_id):
    """One plug-in definition the caller holds `readPlugin` on."""
    require_plugin_readable(plugin_id)
    return definitions.public_json(definitions.get_plugin(plugin_id))
