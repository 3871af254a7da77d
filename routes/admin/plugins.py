"""Plug-in definitions: /api/admin/plugins (manageServer on every route, quirk 5)."""
from flask import Blueprint

import search
from models import PluginDefinition, db
from plugins import definitions
from validation import expects

bp = Blueprint("admin_plugins", __name__, url_prefix="/plugins")


@bp.get("")
def list_plugins():
    """Search plug-in definitions (filter key `type`; `unlimited` allowed)."""
    return search.run(definitions.ADMIN_SEARCH, db.select(PluginDefinition))


@bp.post("")
@expects({"type": "object"})
def create_plugin(body):
    """Register a plug-in (CAD: the image ID is given; CAD+remote: the ID is derived)."""
    definitions.create_plugin(body)
    return "", 201


@bp.patch("/<plugin_id>")
@expects({"type": "object"}, before=lambda plugin_id: definitions.get_plugin(plugin_id))
def patch_plugin(plugin_id, body):
    """Update some fields of a definition; the result must remain a valid definition."""
    definitions.update_plugin(plugin_id, body)
    return "", 204
