"""Plug-in display bundles (``/api/plugin-displays``): files of a plug-in's ``displays/``
folder, served from the plug-in cache and extracted once from a CAD image."""
import logging
import os
import re
import secrets
import shutil
import threading

from flask import current_app

import storage
from errors import ApiError
from models import PluginDefinition, db
from plugins.docker_runner import DockerUnavailableError, docker_copy_folder
from plugins.job_log import PluginRunError

log = logging.getLogger(__name__)

PLUGIN_ID_RE = re.compile(r"^[a-z0-9]+$")

_DISPLAY_LOCKS = {}
_DISPLAY_LOCKS_GUARD = threading.Lock()


def display_file(plugin_id, path):
    """The file ``path`` (relative to the image root, e.g. ``displays/remoteEntry.js``) of a
    plug-in's display bundle, from the plug-in cache; extracted once from a CAD image when
    Docker is there. ApiError 404 whenever there is no such file."""
    if not PLUGIN_ID_RE.match(plugin_id or "") or ".." in path:
        raise ApiError(404, "Not Found")
    plugin = db.session.get(PluginDefinition, plugin_id)
    if plugin is None:
        raise ApiError(404, "The requested plugin/remotePlugin was not found.")
    cache = storage.plugin_cache_dir(plugin_id)
    displays = os.path.join(cache, "displays")
    if not os.path.isdir(displays) and plugin.type == "CAD":
        _extract_displays(plugin_id, cache)
    try:
        full = storage.inside(cache, *[p for p in path.split("/") if p])
    except storage.UnsafePathError:
        raise ApiError(404, "Not Found") from None
    if not os.path.isfile(full):
        raise ApiError(404, "Not Found")
    return full


def _extract_displays(plugin_id, cache):
    with _DISPLAY_LOCKS_GUARD:
        lock = _DISPLAY_LOCKS.setdefault(plugin_id, threading.Lock())
    with lock:
        target = os.path.join(cache, "displays")
        if os.path.isdir(target):
            return
        docker = current_app.config.get("PLUGIN_DOCKER_COMMAND", "docker")
        os.makedirs(cache, exist_ok=True)
        staging = os.path.join(cache, ".extract-" + secrets.token_hex(8))
        try:
            docker_copy_folder(plugin_id, "/displays", staging, docker=docker)
            os.replace(staging, target)
        except DockerUnavailableError as exc:
            log.warning("Displays of %s not extracted: %s", plugin_id, exc)
        except PluginRunError as exc:
            log.info("Plug-in %s has no custom displays: %s", plugin_id, exc)
            os.makedirs(target, exist_ok=True)  # remember: nothing to extract
        finally:
            shutil.rmtree(staging, ignore_errors=True)

