"""Every path under CIRCUS_DATA_DIR, and atomic writes.

Layout: ``dicom/<seriesUid>/<8-digit instance>.dcm``, ``blobs/<sha1>``,
``plugin-results/<jobId>/``, ``downloads/<taskId>``, ``spool/<taskId>/``, ``work/<jobId>/``,
``plugin-cache/<pluginId>/``; and the files of the web UI folder, when one is configured
(``web_ui_file``). Nothing else in the project builds a file path; every path
built from request data goes through ``inside`` so it cannot leave its root.
"""
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

from flask import current_app

log = logging.getLogger(__name__)

ROOTS = ("dicom", "blobs", "plugin-results", "downloads", "spool", "work", "plugin-cache")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
HEX_RE = re.compile(r"^[0-9a-f]{40}$")
ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
NAME_RE = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}$")  # a file name, no dot first


class UnsafePathError(ValueError):
    """Raised when a path built from outside data would leave its storage root."""


def data_dir():
    return current_app.config["CIRCUS_DATA_DIR"]


def root(name):
    """The absolute path of one storage root (created on first use)."""
    if name not in ROOTS:
        raise ValueError(f"unknown storage root {name!r}")
    path = os.path.join(data_dir(), name)
    if not os.path.isdir(path):  # a stat; makedirs costs a failing mkdir every call
        os.makedirs(path, exist_ok=True)
    return path


def inside(base, *parts):
    """Join parts below base; UnsafePathError if the result escapes base (.., absolute)."""
    base = os.path.realpath(base)
    for part in parts:
        if not part or part.startswith(("/", "\\")) or "\x00" in part:
            raise UnsafePathError(part)
    path = os.path.realpath(os.path.join(base, *parts))
    if path != base and not path.startswith(base + os.sep):
        raise UnsafePathError(os.path.join(*parts))
    return path


def _checked_id(value, pattern=ID_RE):
    if not isinstance(value, str) or not pattern.match(value):
        raise UnsafePathError(str(value))
    return value


def series_dir(series_uid):
    """Folder of one series' DICOM files."""
    return os.path.join(root("dicom"), _checked_id(series_uid, UID_RE))


def instance_path(series_uid, instance_number):
    """The file of one instance: dicom/<seriesUid>/<8-digit instance number>.dcm."""
    return os.path.join(series_dir(series_uid), f"{int(instance_number):08d}.dcm")


def dicom_staging_dir(name):
    """A private folder inside the DICOM root (same file system, so renames into series
    folders are atomic) where an import batch stages its files, or a deletion parks them."""
    return os.path.join(root("dicom"), ".staging", _checked_id(name))


def dicom_listener_path(*names):
    """``.staging/net/`` of the DICOM root, or a path below it: the DICOM listeners'
    received instances (one folder per listener process), acknowledged and waiting for
    the index (dicom/net.py)."""
    return os.path.join(dicom_staging_dir("net"), *(_checked_id(name, NAME_RE) for name in names))


def blob_path(sha1):
    return os.path.join(root("blobs"), _checked_id(sha1, HEX_RE))


def download_path(task_id):
    return os.path.join(root("downloads"), _checked_id(task_id))


def spool_dir(task_id):
    return os.path.join(root("spool"), _checked_id(task_id))


def work_dir(job_id):
    return os.path.join(root("work"), _checked_id(job_id))


def results_dir(job_id):
    return os.path.join(root("plugin-results"), _checked_id(job_id))


def plugin_cache_dir(plugin_id):
    return os.path.join(root("plugin-cache"), _checked_id(plugin_id))


def web_ui_file(path):
    """The file ``path`` of the web UI folder (CIRCUS_WEB_UI_DIR), or None when no such
    regular file is there; UnsafePathError for a path that would leave the folder or names
    a hidden entry (``.htaccess`` of the UI's build folder is not for browsers)."""
    if any(segment.startswith(".") for segment in path.split("/")):
        raise UnsafePathError(path)
    full = inside(current_app.config["WEB_UI_DIR"], path)
    return full if os.path.isfile(full) else None


def fsync_dir(path):
    """Make a rename or a new file in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path, mode="wb", fsync=True):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_atomic(path, data, fsync=True):
    """Write bytes to ``path`` atomically."""
    with atomic_file(path, fsync=fsync) as fh:
        fh.write(data)


def remove_tree(path):
    """Remove a folder and everything in it; missing is fine."""
    shutil.rmtree(path, ignore_errors=True)
