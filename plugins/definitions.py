"""Plug-in definitions (API.md 3.5, 3.16, 4.11): validation, remote IDs, create and update.

Two kinds exist: ``CAD`` (a Docker image; ``pluginId`` is the image ID) and ``CAD+remote``
(an HTTP service; ``pluginId`` is derived from adapter, name and version). The stored
document is validated against ``schemas/plugin-cad.yaml`` or ``plugin-remote.yaml``; a
merged PATCH result must be valid too (400, never the reference's 500).
"""
import copy
import hashlib
import json
import logging
import re

from auth import readable_plugin_ids
from errors import ApiError, get_or_404
from models import PluginDefinition, db
from search import SearchSpec
from validation import validate

log = logging.getLogger(__name__)

TYPES = {"CAD": "plugin-cad", "CAD+remote": "plugin-remote"}
ADMIN_SEARCH = SearchSpec(  # GET /api/admin/plugins
    fields={"type": PluginDefinition.type}, serialize=PluginDefinition.to_json,
    default_sort={"pluginId": 1}, unlimited_allowed=True,
    sort_fields={"pluginId": PluginDefinition.plugin_id,
                 "pluginName": PluginDefinition.plugin_name,
                 "version": PluginDefinition.version, "type": PluginDefinition.type,
                 "createdAt": PluginDefinition.created_at,
                 "updatedAt": PluginDefinition.updated_at})
SECRET_KEYS = ("authentication", "authentification")
# wire name -> attribute, for the stored document
FIELDS = {"pluginName": "plugin_name", "version": "version", "type": "type",
          "description": "description", "runConfiguration": "run_configuration",
          "icon": "icon", "displayStrategy": "display_strategy"}


class DuplicatePluginError(ApiError):
    """Raised when a definition with the same plug-in ID already exists."""

    def __init__(self, message):
        super().__init__(400, message)


def remote_plugin_id(adapter, plugin_name, version):
    """``rmt-`` + SHA-256 hex of ``<adapter>:<pluginName>:<version>`` (as CIRCUS derives it).

    A missing adapter is written ``undefined``, as the reference's template string does,
    so that IDs of existing installations are reproduced.
    """
    adapter = "undefined" if adapter is None else str(adapter)
    text = f"{adapter}:{plugin_name}:{version}"
    return "rmt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def get_plugin(plugin_id):
    """The definition with this ID, else ApiError 404 as CIRCUS words it."""
    return get_or_404(PluginDefinition, plugin_id, "plugin/remotePlugin")


def document(plugin):
    """The stored definition without timestamps (what the schemas describe)."""
    doc = {"pluginId": plugin.plugin_id}
    for wire, attr in FIELDS.items():
        doc[wire] = copy.deepcopy(getattr(plugin, attr))
    return doc


def validate_definition(doc):
    """Raise ApiError 400 unless ``doc`` is a complete, valid definition of its type."""
    if not isinstance(doc, dict) or not doc.get("type"):
        raise ApiError(400, "type is required.")
    schema = TYPES.get(doc["type"])
    if schema is None:
        schema = "plugin-cad"  # the enum error of this schema names the allowed types
    validate(doc, schema)


def _apply(plugin, doc):
    plugin.plugin_id = doc["pluginId"]
    for wire, attr in FIELDS.items():
        setattr(plugin, attr, copy.deepcopy(doc[wire]))


def create_plugin(body):
    """Insert a new definition; return its plug-in ID.

    For ``CAD+remote`` the ID is computed (any given one is replaced) and must be new:
    ``400 The combination of adaptor, pluginName, and version must be unique.``
    """
    if not isinstance(body, dict) or not body.get("type"):
        raise ApiError(400, "type is required.")
    doc = dict(body)
    if doc["type"] == "CAD+remote":
        run_configuration = doc.get("runConfiguration")
        adapter = run_configuration.get("adapter") if isinstance(run_configuration, dict) else None
        doc["pluginId"] = remote_plugin_id(adapter, doc.get("pluginName"), doc.get("version"))
    validate_definition(doc)
    if db.session.get(PluginDefinition, doc["pluginId"]) is not None:
        if doc["type"] == "CAD+remote":
            raise DuplicatePluginError(
                "The combination of adaptor, pluginName, and version must be unique.")
        raise DuplicatePluginError("This plug-in is already registered.")
    plugin = PluginDefinition()
    _apply(plugin, doc)
    db.session.add(plugin)
    db.session.commit()
    log.info("Plug-in %s (%s %s) registered.", plugin.plugin_id, plugin.plugin_name,
             plugin.version)
    return plugin.plugin_id


def update_plugin(plugin_id, body):
    """Merge ``body`` into a definition; the result must still be a valid definition."""
    plugin = get_plugin(plugin_id)
    if not isinstance(body, dict):
        raise ApiError(400, "Request data is not correct.")
    if "pluginId" in body and body["pluginId"] != plugin.plugin_id:
        raise ApiError(400, "The primary key cannot be modified.")
    merged = document(plugin)
    merged.update(body)
    validate_definition(merged)
    _apply(plugin, merged)
    db.session.commit()


def public_json(plugin):
    """The definition for non-administrators: remote secrets are never shown to them."""
    doc = plugin.to_json()
    parameters = (doc.get("runConfiguration") or {}).get("parameters")
    if isinstance(parameters, dict) and any(k in parameters for k in SECRET_KEYS):
        doc["runConfiguration"] = dict(doc["runConfiguration"])
        doc["runConfiguration"]["parameters"] = {
            k: v for k, v in parameters.items() if k not in SECRET_KEYS}
    return doc


def readable_plugins(privileges):
    """Definitions on which the caller holds ``readPlugin``, in accessiblePlugins order.

    Dangling plug-in IDs in groups are skipped (quirk 30).
    """
    ids = readable_plugin_ids(privileges)
    if not ids:
        return []
    rows = {p.plugin_id: p for p in db.session.execute(
        db.select(PluginDefinition).where(PluginDefinition.plugin_id.in_(ids))).scalars()}
    return [rows[pid] for pid in ids if pid in rows]


def remote_secret(plugin):
    """The bearer secret of a remote plug-in, under either spelling (quirk 22), or ''."""
    parameters = (plugin.run_configuration or {}).get("parameters") or {}
    for key in SECRET_KEYS:
        if parameters.get(key):
            return str(parameters[key])
    return ""


DEFAULT_CAD_ICON = {"glyph": "calc", "color": "#ffffff", "backgroundColor": "#008800"}
MANIFEST_REQUIRED = ("type", "pluginName", "version", "description")


def check_new_cad_id(image_id):
    """``register-cad-plugin``: the ID must be a 64-char image ID not registered yet."""
    if not isinstance(image_id, str) or not re.match(r"^[a-z0-9]{64}$", image_id):
        raise ApiError(400, "The plug-in ID must be 64-char hex string.")
    if db.session.get(PluginDefinition, image_id) is not None:
        raise DuplicatePluginError("This plug-in is already installed.")


def cad_definition_from_manifest(image_id, manifest_bytes):
    """The definition ``register-cad-plugin`` stores, built from the image's /plugin.json
    (``type`` CAD, ``pluginName``, ``version``, ``description``; optional ``icon`` and
    ``displayStrategy``), with runConfiguration ``{timeout: 900, gpus: ""}``."""
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"The manifest file /plugin.json is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ApiError(400, "The manifest file /plugin.json must hold an object.")
    missing = [key for key in MANIFEST_REQUIRED if key not in manifest]
    if missing:
        raise ApiError(400, "Manifest file validation failed.\n\n"
                       + "\n".join(f"should have required property '{k}'" for k in missing))
    if manifest["type"] != "CAD":
        raise ApiError(400, 'The plug-in type must be "CAD".')
    doc = {"pluginId": image_id, "pluginName": manifest["pluginName"],
           "version": manifest["version"], "type": "CAD",
           "description": manifest.get("description") or "",
           "runConfiguration": {"timeout": 900, "gpus": ""},
           "icon": manifest.get("icon") or dict(DEFAULT_CAD_ICON),
           "displayStrategy": manifest.get("displayStrategy") or []}
    validate_definition(doc)
    same = db.session.execute(db.select(PluginDefinition).where(
        PluginDefinition.plugin_name == doc["pluginName"],
        PluginDefinition.version == doc["version"])).scalars().first()
    if same is not None:
        raise DuplicatePluginError(
            "There is a plugin registered with the same name and the same version.")
    return doc
