"""Every path under CIRCUS_DATA_DIR, atomic writes, and the object store.

Layout: ``dicom/<seriesUid>/<8-digit instance>.dcm``, ``blobs/<sha1>``,
``plugin-results/<jobId>/``, ``downloads/<taskId>``, ``spool/<taskId>/``, ``work/<jobId>/``,
``plugin-cache/<pluginId>/``, ``cache/objects/``; and the files of the web UI folder, when
one is configured (``web_ui_file``). Nothing else in the project builds a file path; every
path built from request data goes through ``inside`` so it cannot leave its root.

The *stored* roots (DICOM files, blobs, plug-in results, downloads, and uploads' spooled
files until their import) are objects of the store chosen by ``CIRCUS_STORAGE_URL``
(``LocalStore``: the data directory itself; ``S3Store``: a bucket, through boto3); work and
cache folders stay local to each host. Writers stage a local file and publish it under its
key before the database commit; readers ask for a local readable path (``fetch``) or a
stream (``open``). Callers never know which store is in use.
"""
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions
import click
from boto3.s3.transfer import TransferConfig
from flask import current_app

log = logging.getLogger(__name__)

ROOTS = ("dicom", "blobs", "plugin-results", "downloads", "spool", "work", "plugin-cache",
         "cache")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
HEX_RE = re.compile(r"^[0-9a-f]{40}$")
ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
NAME_RE = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}$")  # a file name, no dot first


class UnsafePathError(ValueError):
    """Raised when a path or key built from outside data would leave its storage root."""


class StorageConfigError(click.ClickException):
    """Raised at start when the storage setting is wrong or its store does not answer.

    A ClickException: the CLI (``init-db``, ``worker``, ...) prints its message alone and exits
    1; gunicorn.conf.py ends gunicorn with it (no worker is booted again)."""


class StorageError(OSError):
    """Raised when the object store fails (unreachable, refused); an OSError, so callers
    that handle a failing disk handle it too."""


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


# --- the object store ----------------------------------------------------------------------

def store():
    """The app's object store (built once per app by ``init_app``)."""
    found = current_app.extensions.get("circus.store")
    if found is None:
        found = init_app(current_app)
    return found


def init_app(app):
    """Build the store of ``CIRCUS_STORAGE_URL`` and check that it answers (a wrong endpoint,
    credentials or bucket raise StorageConfigError before anything is served)."""
    built = open_store(app.config.get("STORAGE_URL") or "file://",
                       app.config["CIRCUS_DATA_DIR"], app.config)
    app.extensions["circus.store"] = built
    return built


def series_key(series_uid):
    """The key prefix of one series' DICOM files."""
    return f"dicom/{_checked_id(series_uid, UID_RE)}/"


def instance_key(series_uid, instance_number):
    """The key of one instance: dicom/<seriesUid>/<8-digit instance number>.dcm."""
    return f"{series_key(series_uid)}{int(instance_number):08d}.dcm"


def instance_path(series_uid, instance_number):
    """A local readable file of one instance (on an object store: a cached copy);
    FileNotFoundError (an OSError) on a store when there is no such instance."""
    return store().fetch(instance_key(series_uid, instance_number))


def series_stamp(series_uid):
    """Something that changes when files of the series are replaced (None if unknown)."""
    return store().stamp(series_key(series_uid))


def blob_key(sha1):
    return f"blobs/{_checked_id(sha1, HEX_RE)}"


def download_key(task_id):
    return f"downloads/{_checked_id(task_id)}"


def results_key(job_id):
    """The key prefix of a job's result files."""
    return f"plugin-results/{_checked_id(job_id)}/"


def dicom_staging_dir(name):
    """A private folder inside the DICOM root (same file system, so renames into series
    folders are atomic) where an import batch stages its files, or a deletion parks them."""
    return os.path.join(root("dicom"), ".staging", _checked_id(name))


def dicom_listener_path(*names):
    """``.staging/net/`` of the DICOM root, or a path below it: the DICOM listeners'
    received instances (one folder per listener process), acknowledged and waiting for
    the index (dicom/net.py). Local to the host, on every store."""
    return os.path.join(dicom_staging_dir("net"), *(_checked_id(name, NAME_RE) for name in names))


def series_dir(series_uid):
    """The folder of one series' files on the data directory store (tests, benchmarks)."""
    return os.path.join(root("dicom"), _checked_id(series_uid, UID_RE))


def download_path(task_id):
    """The file of a download on the data directory store (tests, benchmarks)."""
    return os.path.join(root("downloads"), _checked_id(task_id))


def blob_path(sha1):
    """A local readable file of a blob (FileNotFoundError when there is none)."""
    return store().fetch(blob_key(sha1))


def download_staging_dirs():
    """This host's local folders where exports write their archives before publishing them
    (``published_file``: beside the downloads on the data directory, else below them)."""
    return [root("downloads"), os.path.join(root("downloads"), ".staging")]


def spool_dir(task_id):
    """The local folder an upload is spooled to (``share_spool`` then stores it)."""
    return os.path.join(root("spool"), _checked_id(task_id))


def share_spool(task_id):
    """Store the spooled files of an upload, so that a worker on any host can import them
    (data directory store: they are already in place)."""
    store().publish_tree(spool_dir(task_id), f"spool/{_checked_id(task_id)}/")


def take_spool(task_id):
    """The local folder holding an upload's stored spool files (fetched if needed)."""
    folder = spool_dir(task_id)
    store().fetch_tree(f"spool/{_checked_id(task_id)}/", folder)
    return folder


def remove_spool(task_id):
    """Delete an upload's spool files, here and in the store."""
    remove_tree(spool_dir(task_id))
    store().delete_prefix(f"spool/{_checked_id(task_id)}/")


def work_dir(job_id):
    return os.path.join(root("work"), _checked_id(job_id))


def results_dir(job_id):
    """The local folder a job's results and log are written to before ``publish_results``
    (on the data directory store, their final place)."""
    return os.path.join(root("plugin-results"), _checked_id(job_id))


def publish_results(job_id, names=None, keep=False):
    """Store the files of ``results_dir(job_id)`` (only ``names`` when given) under the job's
    key prefix; ``keep`` leaves the local folder (its log is still being written)."""
    store().publish_tree(results_dir(job_id), results_key(job_id), names, keep)


def object_cache_dir():
    """This host's cache of objects read from an object store."""
    return os.path.join(root("cache"), "objects")


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
def _temporary_then(folder, finish, mode="wb", fsync=True):
    """A temporary file in ``folder`` opened for writing; after the block its data is
    flushed (and fsynced) and ``finish(tmp)`` puts it in place. On any exception,
    ``finish``'s included, the temporary file is removed."""
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        finish(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextmanager
def atomic_file(path, mode="wb", fsync=True):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    with _temporary_then(os.path.dirname(path), lambda tmp: os.replace(tmp, path), mode,
                         fsync) as fh:
        yield fh


def write_atomic(path, data, fsync=True):
    """Write bytes to ``path`` atomically."""
    with atomic_file(path, fsync=fsync) as fh:
        fh.write(data)


def remove_tree(path):
    """Remove a folder and everything in it; missing is fine."""
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def published_file(key, fsync=True):
    """Write a new object: yields a local file opened for writing; on success it is
    made durable and published under ``key`` (data directory: renamed into place; object
    store: uploaded, multipart when large). On any exception nothing is published."""
    target = store()
    with _temporary_then(target.staging_dir(key), lambda tmp: target.publish(tmp, key),
                         fsync=fsync and target.publish_needs_fsync) as fh:
        yield fh


# --- the stores ------------------------------------------------------------------------------

# spool/: an upload's files, stored until its import task (on any host) has read them
STORED_ROOTS = ("dicom", "blobs", "plugin-results", "downloads", "spool")


def check_key(key):
    """``key`` if it stays below its store's root and prefix (no ``..``, ``.``, empty or
    absolute segments, no backslash or NUL); UnsafePathError otherwise."""
    if not isinstance(key, str) or not key or "\\" in key or "\x00" in key:
        raise UnsafePathError(str(key))
    parts = key.split("/")
    if parts[-1] == "":  # a prefix: a root alone is one
        parts = parts[:-1]
    elif len(parts) < 2:
        raise UnsafePathError(key)  # an object is never a root itself
    if not parts or parts[0] not in STORED_ROOTS or \
            any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(key)
    return key


class Placed(NamedTuple):
    """Where ``publish`` put an object: ``path`` is the local file now in place (whose
    durability is the caller's, as it batches fsyncs), None when the store made it durable;
    ``new_folder`` says a folder was created for it."""
    path: str | None
    new_folder: bool


class LocalStore:
    """``file://``: objects are the files of the data directory, at their keys (the layout
    of the module docstring). Publishing is a rename; reading is the file itself."""

    publish_is_durable = False  # the caller fsyncs (a batch pays one syncfs for all files)
    publish_needs_fsync = True

    def __init__(self, data_dir):
        self.base = data_dir

    def check(self):
        """Nothing to check: the data directory exists."""

    def path(self, key):
        return os.path.join(self.base, check_key(key))

    def staging_dir(self, key):
        """A local folder for files about to become ``key`` (renames from it are atomic)."""
        return os.path.dirname(self.path(key))

    def publish(self, local, key, known_folders=None):
        target = self.path(key)
        folder = os.path.dirname(target)
        new_folder = False
        if known_folders is None or folder not in known_folders:
            if not os.path.isdir(folder):  # one stat per folder of a batch
                os.makedirs(folder, exist_ok=True)
                new_folder = True
            if known_folders is not None:
                known_folders.add(folder)
        os.replace(local, target)
        return Placed(target, new_folder)

    def publish_many(self, pairs):
        folders = set()
        return [self.publish(local, key, folders) for local, key in pairs]

    def publish_tree(self, folder, prefix, names=None, keep=False):
        target = self.path(prefix).rstrip("/")
        if os.path.realpath(folder) != os.path.realpath(target):
            shutil.copytree(folder, target, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

    def fetch_tree(self, prefix, folder):
        """Copy the objects below ``prefix`` into the local ``folder`` (in place: nothing)."""
        if os.path.realpath(folder) != os.path.realpath(self.path(prefix).rstrip("/")):
            shutil.copytree(self.path(prefix), folder, dirs_exist_ok=True)

    def prefetch(self, keys):
        """Nothing to do: the files are here."""

    def put_copy(self, local, key):
        """Store a copy of the local file ``local`` as ``key`` (the file stays)."""
        with atomic_file(self.path(key)) as fh, open(local, "rb") as source:
            shutil.copyfileobj(source, fh, 1024 * 1024)

    def size(self, key):
        try:
            return os.stat(self.path(key)).st_size
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such object", key) from None

    def fetch(self, key):
        if key.startswith("plugin-results/"):
            # A plug-in's output is untrusted: a link in it must not lead out.
            return inside(self.base, *check_key(key).split("/"))
        # No stat: the caller's open reports a missing file (FileNotFoundError).
        return self.path(key)

    def open(self, key):
        fh = open(self.path(key), "rb")
        return fh, os.fstat(fh.fileno()).st_size

    def exists(self, key):
        return os.path.isfile(self.path(key))

    def delete(self, key):
        try:
            os.unlink(self.path(key))
        except OSError:
            pass

    def delete_prefix(self, prefix):
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def park(self, prefix):
        """Move the objects of ``prefix`` out of sight (undone by ``unpark``, ended by
        ``purge``); a token, None when there was nothing."""
        folder = self.path(prefix).rstrip("/")
        if not os.path.isdir(folder):
            return None
        parked = os.path.join(self.base, "dicom", ".staging",
                              f"deleted-{os.getpid()}-{time.time_ns()}")
        os.makedirs(os.path.dirname(parked), exist_ok=True)
        os.replace(folder, parked)
        return (folder, parked)

    def unpark(self, token):
        if token is not None:
            os.replace(token[1], token[0])

    def purge(self, token):
        if token is not None:
            shutil.rmtree(token[1], ignore_errors=True)

    def list(self, prefix):
        """``(key, size, mtime)`` of every object below ``prefix`` (no dot-names, no links)."""
        base = self.path(prefix).rstrip("/")
        for folder, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            relative = os.path.relpath(folder, self.base).replace(os.sep, "/")
            for name in files:
                if name.startswith("."):
                    continue
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                if not os.path.islink(os.path.join(folder, name)):
                    yield f"{relative}/{name}", info.st_size, info.st_mtime

    def list_tree(self, prefix):
        """Relative paths of the files and folders below ``prefix`` (no dot-names, no links)."""
        base = self.path(prefix).rstrip("/")
        found = []
        for folder, dirs, files in os.walk(base, followlinks=False):
            dirs[:] = [d for d in dirs if not d.startswith(".")
                       and not os.path.islink(os.path.join(folder, d))]
            relative = os.path.relpath(folder, base)
            for name in dirs + [f for f in files if not f.startswith(".")
                                and not os.path.islink(os.path.join(folder, f))]:
                path = name if relative == "." else os.path.join(relative, name)
                found.append(path.replace(os.sep, "/"))
        return found

    def stamp(self, prefix):
        try:
            return os.stat(self.path(prefix).rstrip("/")).st_mtime_ns
        except OSError:
            return None


MULTIPART_BYTES = 8 * 1024 * 1024  # objects from this size upload (and download) in parts
PUBLISH_THREADS = 8  # parallel uploads of one import batch
FETCH_THREADS = 8  # parallel downloads into the host cache (prefetch of a volume's slices)


def _store_error(exc, key=None):
    """The OSError of a failed store call: FileNotFoundError for a missing object."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return FileNotFoundError(2, "No such object", key)
    return StorageError(f"The object store failed: {exc}")


class ObjectCache:
    """A host's folder of objects read from the store, named by key and ETag (a replaced
    object is fetched afresh), the least recently used dropped past ``limit`` bytes.

    Files used in the last ``KEEP_SECONDS`` are never dropped: a reader opens the path it
    was given just after ``fetch`` returns it (the limit may be passed by that much).
    """

    KEEP_SECONDS = 30

    def __init__(self, folder, limit):
        self.folder = folder
        self.limit = limit
        self._added = 0
        self._lock = threading.Lock()

    def path(self, key, etag):
        return os.path.join(self.folder, key + "." + re.sub(r"[^0-9A-Za-z-]", "", etag))

    def hit(self, path):
        try:
            os.utime(path)  # the LRU order is the mtime order
            return True
        except OSError:
            return False

    def added(self, size):
        with self._lock:
            self._added += size
            if self._added < self.limit // 8:
                return
            self._added = 0
        self.evict()

    def evict(self):
        """Drop the least recently used files until the folder is under its limit."""
        entries = []
        for folder, _dirs, files in os.walk(self.folder):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    info = os.stat(path)
                except OSError:
                    continue
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        recent = time.time() - self.KEEP_SECONDS
        for mtime, size, path in sorted(entries):
            if total <= self.limit * 0.9 or mtime > recent:
                break
            try:
                os.unlink(path)  # a reader's open file or map stays valid
            except OSError:
                pass
            total -= size


class S3Store:
    """``s3://bucket/prefix``: objects of an S3-compatible store (boto3), read through a
    bounded per-host cache (``fetch``) or streamed (``open``)."""

    publish_is_durable = True  # an upload is complete (and durable) when it returns
    publish_needs_fsync = False

    def __init__(self, bucket, prefix, data_dir, config):
        self.bucket = bucket
        self.prefix = prefix
        self.data_dir = data_dir
        self.create_bucket = bool(config.get("S3_CREATE_BUCKET"))
        self.session = boto3.session.Session()
        self.client = self.session.client(
            "s3", endpoint_url=config.get("S3_ENDPOINT_URL") or None,
            config=botocore.config.Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                read_timeout=60, max_pool_connections=32, s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES,
                                       multipart_chunksize=MULTIPART_BYTES, max_concurrency=4)
        self.cache = ObjectCache(os.path.join(data_dir, "cache", "objects"),
                                 int(config.get("OBJECT_CACHE_BYTES") or 2 * 1024**3))
        self._pool = None
        self._pool_pid = None
        self._fetch_pool = None
        self._fetching = {}  # key -> Future of the download in flight (one per key)
        self._fetching_lock = threading.Lock()

    def _name(self, key):
        return self.prefix + check_key(key)

    def check(self):
        """Refuse to start on a store that does not answer, refused credentials, or a
        missing bucket (created instead when CIRCUS_S3_CREATE_BUCKET=1). A listing, not a
        HEAD: its refusal says why (a HEAD's answer has no body)."""
        where = f"s3://{self.bucket}/{self.prefix} at {self.client.meta.endpoint_url}"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            return
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageConfigError(self._refusal(where, exc.response["Error"])) from None
        except botocore.exceptions.NoCredentialsError:
            raise StorageConfigError(f"No credentials for the object store {where}: set "
                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or another "
                                     "AWS credential source).") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageConfigError(f"The object store {where} cannot be reached: "
                                     f"{exc}") from None
        if not self.create_bucket:
            raise StorageConfigError(f"The bucket {self.bucket!r} does not exist ({where}); "
                                     "create it, or set CIRCUS_S3_CREATE_BUCKET=1.")
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as exc:
            raise StorageConfigError(f"The bucket {self.bucket!r} cannot be created: "
                                     f"{exc}") from None

    def _refusal(self, where, error):
        """The start-up message of a store that refused the check with ``error`` (its
        Code and Message): refused credentials are named."""
        code = str(error.get("Code", ""))
        credentials = self.session.get_credentials()  # resolved when the client was built
        key = f"the access key {credentials.access_key!r}" if credentials else "the access key"
        if code == "InvalidAccessKeyId":
            why = f"{key} (AWS_ACCESS_KEY_ID) is unknown to the store"
        elif code == "SignatureDoesNotMatch":
            why = f"the secret key (AWS_SECRET_ACCESS_KEY) does not match {key}"
        elif code in ("AccessDenied", "403"):
            why = f"{key} may not list the bucket; check its permissions"
        else:
            return f"The object store {where} refused the check ({code}): {error.get('Message')}"
        return f"The object store {where} refused the credentials ({code}): {why}."

    def staging_dir(self, key):
        return os.path.join(self.data_dir, check_key(key).split("/", 1)[0], ".staging")

    def _upload(self, local, key):
        try:
            self.client.upload_file(local, self.bucket, self._name(key), Config=self.transfer)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                boto3.exceptions.S3UploadFailedError) as exc:
            raise _store_error(exc, key) from None

    put_copy = _upload

    def size(self, key):
        return self._head(key)["ContentLength"]

    def publish(self, local, key):
        self._upload(local, key)
        os.unlink(local)
        return Placed(None, False)

    def publish_many(self, pairs):
        if len(pairs) < 2:
            return [self.publish(local, key) for local, key in pairs]
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="s3-publish")
            self._pool_pid = os.getpid()
        return list(self._pool.map(lambda pair: self.publish(*pair), pairs))

    def publish_tree(self, folder, prefix, names=None, keep=False):
        pairs = []
        for base, _dirs, files in os.walk(folder, followlinks=False):
            for name in files:
                path = os.path.join(base, name)
                relative = os.path.relpath(path, folder).replace(os.sep, "/")
                if os.path.islink(path) or not os.path.isfile(path) or \
                        (names is not None and relative not in names):
                    continue
                pairs.append((path, check_key(prefix + relative)))
        if keep:  # publish copies, the files stay
            for path, key in pairs:
                self._upload(path, key)
        else:
            self.publish_many(pairs)
            shutil.rmtree(folder, ignore_errors=True)

    def _head(self, key):
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _store_error(exc, key) from None

    def prefetch(self, keys):
        """Start fetching ``keys`` into the cache on a few threads (the image server asks
        for the slices it will decode next: their round trips overlap)."""
        with self._fetching_lock:
            if self._fetch_pool is None or self._fetch_pid != os.getpid():
                self._fetch_pool = ThreadPoolExecutor(FETCH_THREADS,
                                                      thread_name_prefix="s3-fetch")
                self._fetch_pid = os.getpid()
                self._fetching = {}
            for key in keys:
                if key not in self._fetching:
                    self._fetching[key] = self._fetch_pool.submit(self._fetch_once, key)

    def fetch(self, key):
        with self._fetching_lock:
            pending = self._fetching.get(key)
        if pending is not None:
            return pending.result()  # its error too
        return self._fetch(key)

    def _fetch_once(self, key):
        try:
            return self._fetch(key)
        finally:
            with self._fetching_lock:
                self._fetching.pop(key, None)

    def _fetch(self, key):
        head = self._head(key)
        path = self.cache.path(key, head["ETag"])
        if self.cache.hit(path):
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._name(key), tmp, Config=self.transfer)
            os.replace(tmp, path)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _store_error(exc, key) from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.cache.added(head["ContentLength"])
        return path

    def fetch_tree(self, prefix, folder):
        for key, _size, _mtime in list(self.list(prefix)):
            target = os.path.join(folder, *key[len(prefix):].split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                self.client.download_file(self.bucket, self._name(key), target,
                                          Config=self.transfer)
            except (botocore.exceptions.BotoCoreError,
                    botocore.exceptions.ClientError) as exc:
                raise _store_error(exc, key) from None

    def open(self, key):
        """A stream of the object (read in chunks) and its size."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _store_error(exc, key) from None
        return answer["Body"], answer["ContentLength"]

    def exists(self, key):
        try:
            self._head(key)
            return True
        except FileNotFoundError:
            return False

    def delete(self, key):
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _store_error(exc, key) from None

    def delete_prefix(self, prefix):
        keys = [key for key, _size, _mtime in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._name(k)} for k in keys[i:i + 1000]],
                    "Quiet": True})
            except (botocore.exceptions.BotoCoreError,
                    botocore.exceptions.ClientError) as exc:
                raise _store_error(exc, prefix) from None

    # Listed under the caller's lock, deleted once its rows are gone: an import committing
    # in between adds keys this list does not hold (one replacing a listed key within that
    # moment is lost with it; the rows then say so: a missing image, never a wrong one).
    def park(self, prefix):
        return [key for key, _size, _mtime in self.list(prefix)]

    def unpark(self, token):
        pass

    def purge(self, token):
        for key in token:
            self.delete(key)

    def list(self, prefix):
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._name(prefix)):
                for item in page.get("Contents", ()):
                    yield (item["Key"][len(self.prefix):], item["Size"],
                           item["LastModified"].timestamp())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _store_error(exc, prefix) from None

    def list_tree(self, prefix):
        found = set()
        for key, _size, _mtime in self.list(prefix):
            parts = key[len(prefix):].split("/")
            if any(p.startswith(".") for p in parts):
                continue
            for i in range(1, len(parts) + 1):
                found.add("/".join(parts[:i]))
        return sorted(found)

    def stamp(self, prefix):
        return None  # the series row's images and updatedAt tell a re-import


def open_store(url, data_dir, config):
    """The store of a ``CIRCUS_STORAGE_URL``, checked; StorageConfigError when unusable."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc or parsed.path not in ("", "/"):
            raise StorageConfigError("CIRCUS_STORAGE_URL file:// takes no path: the data "
                                     "directory (CIRCUS_DATA_DIR) is the store.")
        return LocalStore(data_dir)
    if parsed.scheme != "s3" or not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
                                             parsed.netloc or ""):
        raise StorageConfigError(f"CIRCUS_STORAGE_URL must be file:// or "
                                 f"s3://bucket/prefix, not {url!r}.")
    prefix = parsed.path.strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise StorageConfigError(f"The prefix of CIRCUS_STORAGE_URL is not usable: {url!r}.")
    found = S3Store(parsed.netloc, prefix + "/" if prefix else "", data_dir, config)
    found.check()
    return found


# --- moving a data directory into a store ----------------------------------------------------

MIGRATED_ROOTS = ("dicom", "blobs", "plugin-results", "downloads")


class MigrationError(RuntimeError):
    """Raised when a copied object does not have the size of its source."""


def migration_plan(source, target):
    """``(to_copy, skipped)``: lists of ``(key, size)`` of the source's objects, those the
    target lacks (or holds with another size) and those it already holds (a run that was
    interrupted resumes where it stopped)."""
    to_copy, skipped = [], []
    for name in MIGRATED_ROOTS:
        there = {key: size for key, size, _mtime in target.list(name + "/")}
        for key, size, _mtime in source.list(name + "/"):
            (skipped if there.get(key) == size else to_copy).append((key, size))
    return to_copy, skipped


def migrate(source, target, to_copy, on_copied=None):
    """Copy each ``(key, size)`` of ``to_copy`` from ``source`` to ``target`` and check the
    stored size; MigrationError on a mismatch (the object is removed again)."""
    for key, size in to_copy:
        target.put_copy(source.fetch(key), key)
        stored = target.size(key)
        if stored != size:
            target.delete(key)
            raise MigrationError(f"{key}: {stored} bytes stored for {size} read.")
        if on_copied is not None:
            on_copied(key, size)
