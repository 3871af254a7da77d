"""Running plug-in jobs (API.md 5): input preparation, the Docker and remote runners, result
recording, the worker source that takes jobs from the queue, and crash recovery.

One job: ``work/<jobId>/in`` gets ``<i>.raw|.mhd|.json`` per series (``volumes``); the
runner chosen by the plug-in type fills ``work/<jobId>/out``; ``out/results.json`` is
validated and stored in the job; every regular file of ``out/`` is copied read-only to
``plugin-results/<jobId>/``, beside the job log ``plugin-log.txt``; the work folder is
removed. Any failure ends the job ``failed`` with a message users can act on.

Nothing a plug-in returns can write outside the job's folders: archives are checked entry
by entry (no absolute paths, ``..``, links or devices) and links in ``out/`` are never
followed when results are copied.
"""
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import timedelta

import requests
import sqlalchemy as sa
from flask import current_app
from jsonschema import Draft7Validator

import plugin_definitions
import plugin_jobs
import storage
import worker
from errors import ApiError
from models import PluginDefinition, PluginJob, SystemState, db, iso, parse_iso, utcnow
from validation import load_schema

log = logging.getLogger(__name__)

LOG_NAME = "plugin-log.txt"
RESULTS_NAME = "results.json"
RESULTS_WAIT_MS = 2000  # how long results.json may take to appear after the run (5.6)
RESULTS_POLL_SECONDS = 0.5
RESULTS_MAX_BYTES = 16 * 1024 * 1024  # results.json is stored in the job row
DOCKER_DEFAULT_TIMEOUT = 3000  # seconds, when runConfiguration.timeout is absent (5.4)
DOCKER_STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL when a container is stopped
CONTAINER_IN, CONTAINER_OUT = "/circus/in", "/circus/out"
REMOTE_ADAPTERS = ("default", "defaultHttpAdapter")
REMOTE_DEFAULT_TIMEOUT = 300  # seconds until the headers of POST <endpoint>/run (5.5)
REMOTE_RESULT_TIMEOUT = 30  # seconds until the headers of GET <endpoint>/result/<id>
REMOTE_ARCHIVE_MAX_BYTES = 8 * 1024 ** 3
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")
HEARTBEAT_SECONDS = 15
STALE_AFTER = timedelta(seconds=120)  # a worker without heartbeat for this long has died
SWEEP_SECONDS = 60
INTERRUPTED = "The job was interrupted because the worker running it stopped."
PLUGIN_ID_RE = re.compile(r"^[a-z0-9]+$")


class PluginRunError(Exception):
    """Raised when a job cannot run to its end; the message becomes the job's errorMessage."""


class DockerUnavailableError(PluginRunError):
    """Raised when the docker command is missing or no Docker engine answers."""


# --- the job log ----------------------------------------------------------------------------

class JobLog:
    """``plugin-log.txt``: timestamped lines, and raw output of the plug-in appended as is."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._fh = open(path, "ab", buffering=0)
        self._lock = threading.Lock()

    def line(self, text):
        """Append ``[<ISO time>] text`` (every line of a multi-line text is stamped)."""
        stamp = "[" + iso(utcnow()) + "] "
        data = "".join(stamp + part + "\n" for part in str(text).splitlines() or [""])
        self.raw(data.encode("utf-8", "replace"))

    def raw(self, data):
        with self._lock:
            self._fh.write(data)

    def close(self):
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- input preparation ----------------------------------------------------------------------

def prepare_input(series, in_dir, job_log):
    """Write ``<i>.raw``, ``<i>.mhd``, ``<i>.json`` for every series entry (5.3).

    ``requiredPrivateTags`` is not passed on, as in the reference (quirk 29).
    """
    import volumes  # the volume module of the tasks issue
    os.makedirs(in_dir, exist_ok=True)
    for index, entry in enumerate(series):
        pvd = entry["partialVolumeDescriptor"]
        job_log.line(f"Preparing volume #{index}: series {entry['seriesUid']} "
                     f"(images {pvd['start']} to {pvd['end']}, step {pvd['delta']})")
        try:
            volumes.write_plugin_input(entry["seriesUid"], pvd, in_dir, index)
        except volumes.VolumeError as exc:
            raise PluginRunError(str(exc)) from None
        except storage.UnsafePathError:
            raise PluginRunError(f"Series {entry['seriesUid']} not found.") from None


# --- Docker ---------------------------------------------------------------------------------

def container_name(job_id):
    return f"circus-job-{job_id}"


def docker_timeout(plugin):
    """The container timeout in seconds (None = none): runConfiguration.timeout, 0 = none."""
    timeout = (plugin.run_configuration or {}).get("timeout", DOCKER_DEFAULT_TIMEOUT)
    return None if not timeout else int(timeout)


def docker_command(plugin, name, in_dir, out_dir, uid=None, gid=None, docker="docker"):
    """The ``docker run`` argument list for a CAD plug-in (5.4, quirk 22 fixed).

    No network, the job manager's uid:gid, ``in/`` mounted read-only on /circus/in and
    ``out/`` on /circus/out, the container removed when it exits, ``--gpus`` from
    runConfiguration.gpus, and no implicit pull (the image is the plug-in ID).
    """
    for path in (in_dir, out_dir):
        if ":" in path or "," in path:
            raise PluginRunError("The work directory path must not contain ':' or ','.")
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    command = [docker, "run", "--rm", "--name", name, "--network", "none",
               "--pull", "never", "--user", f"{uid}:{gid}",
               "-v", f"{in_dir}:{CONTAINER_IN}:ro", "-v", f"{out_dir}:{CONTAINER_OUT}"]
    gpus = (plugin.run_configuration or {}).get("gpus")
    if gpus:
        command += ["--gpus", str(gpus)]
    command.append(plugin.plugin_id)
    return command


def _docker_quietly(docker, *args, timeout=60):
    try:
        return subprocess.run([docker, *args], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_docker(plugin, job_id, in_dir, out_dir, job_log, docker="docker"):
    """Run a CAD plug-in's container; its output goes to the job log.

    Raises PluginRunError on timeout (the container is stopped and removed), when Docker is
    missing, or when the container exits with a non-zero status (quirk 23; logs are kept).
    """
    os.makedirs(out_dir, exist_ok=True)
    name = container_name(job_id)
    command = docker_command(plugin, name, in_dir, out_dir, docker=docker)
    timeout = docker_timeout(plugin)
    job_log.line("Executing the plug-in (Docker): " + " ".join(command))
    tail = []
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DockerUnavailableError(
            f"Docker is not available: the command {docker!r} was not found.") from None

    def pump():
        for chunk in iter(lambda: process.stdout.readline(), b""):
            job_log.raw(chunk)
            tail.append(chunk)
            del tail[:-20]
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job_log.line(f"Timeout after {timeout} s: stopping container {name}")
        _docker_quietly(docker, "stop", "-t", str(DOCKER_STOP_GRACE), name)
        _docker_quietly(docker, "rm", "-f", name)
        process.kill()
        process.wait()
        reader.join(5)
        raise PluginRunError(
            f"The container did not finish within the timeout of {timeout * 1000} ms.") from None
    reader.join()
    if status != 0:
        last = b"".join(tail).decode("utf-8", "replace").strip().splitlines()
        detail = last[-1] if last else ""
        job_log.line(f"The container exited with status {status}.")
        if status == 125 or "Cannot connect to the Docker daemon" in detail:
            raise PluginRunError(f"The container could not be started: {detail}")
        raise PluginRunError(f"The plug-in exited with status {status}.")


def docker_available(docker="docker"):
    """Whether a Docker engine answers (``docker info``)."""
    result = _docker_quietly(docker, "info", timeout=20)
    return result is not None and result.returncode == 0


def docker_read_file(image, path, docker="docker"):
    """The bytes of one file in an image (``docker create`` + ``docker cp`` as a tar stream)."""
    created = _docker_quietly(docker, "create", "--pull", "never", image)
    if created is None:
        raise DockerUnavailableError(f"Docker is not available: the command {docker!r} failed.")
    if created.returncode != 0:
        raise PluginRunError("Docker could not create a container of the image: "
                             + created.stderr.decode("utf-8", "replace").strip())
    container = created.stdout.decode().strip()
    try:
        copied = _docker_quietly(docker, "cp", f"{container}:{path}", "-")
        if copied is None or copied.returncode != 0:
            raise PluginRunError(f"The image has no file {path}.")
        with tarfile.open(fileobj=io.BytesIO(copied.stdout)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            if member is None:
                raise PluginRunError(f"The image has no file {path}.")
            return tar.extractfile(member).read()
    finally:
        _docker_quietly(docker, "rm", "-f", container)


def docker_copy_folder(image, path, target, docker="docker"):
    """Copy a folder of an image to ``target`` (which must not exist yet)."""
    created = _docker_quietly(docker, "create", "--pull", "never", image)
    if created is None or created.returncode != 0:
        raise DockerUnavailableError("Docker could not create a container of the image.")
    container = created.stdout.decode().strip()
    try:
        copied = _docker_quietly(docker, "cp", f"{container}:{path}", target, timeout=600)
        if copied is None or copied.returncode != 0:
            raise PluginRunError(f"The image has no folder {path}.")
    finally:
        _docker_quietly(docker, "rm", "-f", container)


# --- remote plug-ins (HTTP) -----------------------------------------------------------------

class MultipartBody:
    """A ``multipart/form-data`` body of files, streamed from disk with a known length."""

    def __init__(self, paths, field="files"):
        self.boundary = "circus-" + secrets.token_hex(16)
        self._parts = []
        for path in paths:
            name = os.path.basename(path).replace('"', "")
            self._parts.append((
                f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode("utf-8"))
            self._parts += [path, b"\r\n"]
        self._parts.append(f"--{self.boundary}--\r\n".encode("ascii"))
        self.length = sum(len(p) if isinstance(p, bytes) else os.path.getsize(p)
                          for p in self._parts)

    @property
    def content_type(self):
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self):
        return self.length

    def __iter__(self):
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
            else:
                with open(part, "rb") as fh:
                    yield from iter(lambda: fh.read(1024 * 1024), b"")


def sse_events(chunks):
    """Server-sent events ``(type, data)`` from a byte-chunk iterator (``data`` decoded from
    JSON when it is JSON, else the text). An event cut off by the end of the stream counts."""
    buffer, event, data = b"", None, []

    def line_ends(raw):
        nonlocal event, data
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if line == "":
            complete = (event or "message", _sse_data("\n".join(data))) \
                if event is not None or data else None
            event, data = None, []
            return complete
        if not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        return None

    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            complete = line_ends(raw)
            if complete is not None:
                yield complete
    for raw in (buffer, b""):
        complete = line_ends(raw)
        if complete is not None:
            yield complete


def _sse_data(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _remote_settings(plugin):
    """(endpoint, secret, timeout) of a remote plug-in; PluginRunError for an unknown adapter."""
    configuration = plugin.run_configuration or {}
    adapter = configuration.get("adapter")
    if adapter not in REMOTE_ADAPTERS:
        raise PluginRunError(f"No such adapter: {adapter if adapter is not None else 'undefined'}")
    parameters = configuration.get("parameters") or {}
    endpoint = str(parameters.get("endpoint") or "").rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise PluginRunError("Remote CAD failed: Internal error: No endpoint is configured.")
    timeout = parameters.get("timeout", REMOTE_DEFAULT_TIMEOUT)
    return endpoint, plugin_definitions.remote_secret(plugin), (int(timeout) if timeout else None)


def _remote_failed(message):
    return PluginRunError(f"Remote CAD failed: {message}")


def run_remote(plugin, in_dir, out_dir, work_dir, job_log):
    """Run a CAD+remote plug-in with the HTTP protocol of 5.5; the result tar ends in out/."""
    endpoint, secret, timeout = _remote_settings(plugin)
    headers = {"Authorization": f"Bearer {secret}"}
    files = sorted(os.path.join(in_dir, name) for name in os.listdir(in_dir)
                   if os.path.isfile(os.path.join(in_dir, name))
                   and not os.path.islink(os.path.join(in_dir, name)))
    body = MultipartBody(files)
    job_log.line(f"Executing the plug-in (Remote CAD): POST {endpoint}/run "
                 f"({len(files)} files, {body.length} bytes)")
    try:
        response = requests.post(f"{endpoint}/run", data=body, stream=True,
                                 headers={**headers, "Content-Type": body.content_type},
                                 timeout=(timeout, timeout), allow_redirects=False)
    except requests.Timeout:
        raise _remote_failed(f"Internal error: The plug-in server did not answer within "
                             f"{timeout} s.") from None
    except requests.RequestException as exc:
        raise _remote_failed(f"Internal error: {_short(exc)}") from None
    with response:
        if not 200 <= response.status_code < 300:
            job_log.line(f"[Remote CAD] POST /run answered HTTP {response.status_code}: "
                         + _excerpt(response))
            raise _remote_failed("Failed to submit job")
        request_id = response.headers.get("X-Request-ID")
        if not request_id:
            raise _remote_failed("Internal error: No X-Request-ID header in response")
        if not REQUEST_ID_RE.match(request_id):
            raise _remote_failed("Internal error: Invalid X-Request-ID header in response")
        error = None
        try:
            for event, data in sse_events(response.iter_content(chunk_size=None)):
                if event == "log":
                    job_log.line(f"[Remote CAD] {data}")
                elif event in ("error", "internalServerError"):
                    error = data if isinstance(data, str) else json.dumps(data)
                    job_log.line(f"[Remote CAD] {event}: {error}")
                elif event == "finished":
                    break
        except requests.RequestException as exc:
            error = f"Error reading server response: {_short(exc)}"
        if error is not None:
            raise _remote_failed(error)
    _fetch_result(f"{endpoint}/result/{request_id}", headers, out_dir, work_dir, job_log)


def _fetch_result(url, headers, out_dir, work_dir, job_log):
    archive = os.path.join(work_dir, "result.tar")
    job_log.line("[Remote CAD] Fetching the result archive")
    try:
        with requests.get(url, headers=headers, stream=True, allow_redirects=False,
                          timeout=(REMOTE_RESULT_TIMEOUT, REMOTE_RESULT_TIMEOUT)) as response:
            if not 200 <= response.status_code < 300:
                job_log.line(f"[Remote CAD] GET /result answered HTTP {response.status_code}: "
                             + _excerpt(response))
                raise _remote_failed("Failed to fetch result data")
            size = 0
            with open(archive, "wb") as fh:
                for chunk in response.iter_content(chunk_size=1024 * 1024):
                    size += len(chunk)
                    if size > REMOTE_ARCHIVE_MAX_BYTES:
                        raise _remote_failed("The result archive is too large.")
                    fh.write(chunk)
    except requests.RequestException as exc:
        raise _remote_failed(f"Failed to fetch result data: {_short(exc)}") from None
    try:
        extract_tar(archive, out_dir)
    finally:
        os.unlink(archive)


def _short(exc):
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _excerpt(response):
    try:
        return response.raw.read(500, decode_content=True).decode("utf-8", "replace")
    except Exception:  # the body is only shown in the log
        return ""


class UnsafeArchiveError(PluginRunError):
    """Raised when a result archive has an entry that could write outside out/."""


def _entry_parts(name):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or "\\" in name or ".." in parts or "\x00" in name:
        raise UnsafeArchiveError(
            f"Remote CAD failed: Unsafe entry in the result archive: {name}")
    return parts


def extract_tar(archive, out_dir):
    """Extract a tar (gzip allowed) into ``out_dir`` after checking every entry: only
    regular files and folders, relative paths without ``..``. Nothing is written when
    one entry is unsafe."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise _remote_failed(f"The result archive cannot be read: {_short(exc)}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _remote_failed(f"The result archive cannot be read: {_short(exc)}") from None
        checked = []
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise UnsafeArchiveError("Remote CAD failed: Unsafe entry in the result archive: "
                                         f"{member.name} (not a regular file or folder)")
            checked.append((member, _entry_parts(member.name)))
        os.makedirs(out_dir, exist_ok=True)
        for member, parts in checked:
            if not parts:
                continue
            target = storage.inside(out_dir, *parts)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = tar.extractfile(member)
            with open(target, "wb") as fh:
                shutil.copyfileobj(source, fh, 1024 * 1024)


# --- results ----------------------------------------------------------------------------------

def wait_for_results(out_dir):
    """Wait up to 2 s (polling every 0.5 s) for out/results.json (5.6)."""
    path = os.path.join(out_dir, RESULTS_NAME)
    deadline = time.monotonic() + RESULTS_WAIT_MS / 1000
    while not os.path.isfile(path):
        if time.monotonic() >= deadline:
            raise PluginRunError(
                f"Timeout: File out/{RESULTS_NAME} did not appear within {RESULTS_WAIT_MS}ms")
        time.sleep(RESULTS_POLL_SECONDS)
    return path


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def read_results(out_dir):
    """Parse and validate out/results.json; return the whole document (5.6)."""
    path = os.path.join(out_dir, RESULTS_NAME)
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            raise ValueError(f"{RESULTS_NAME} is not a regular file")
        if os.path.getsize(path) > RESULTS_MAX_BYTES:
            raise ValueError(f"{RESULTS_NAME} is larger than {RESULTS_MAX_BYTES} bytes")
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
        results = json.loads(text, parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PluginRunError(f"Plug-in validation failed: {exc}") from None
    errors = sorted(_results_validator().iter_errors(results),
                    key=lambda e: list(e.absolute_path))
    if errors:
        reasons = "; ".join(
            ("/".join(str(p) for p in e.absolute_path) or "results.json") + " " + e.message
            for e in errors[:5])
        raise PluginRunError(f"Plug-in validation failed: {reasons}")
    return results


def copy_outputs(out_dir, target_dir, job_log=None, read_only=True):
    """Copy every regular file of out/ (sub-folders too) into ``target_dir``; links and
    special files are skipped, never followed. Files are made read-only."""
    for folder, dirs, files in os.walk(out_dir, followlinks=False):
        relative = os.path.relpath(folder, out_dir)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            source = os.path.join(folder, name)
            rel = name if relative == "." else os.path.join(relative, name)
            if os.path.islink(source) or not os.path.isfile(source):
                if job_log is not None:
                    job_log.line(f"Skipped {rel}: not a regular file")
                continue
            destination = storage.inside(target_dir, *rel.split(os.sep))
            with open(source, "rb") as src, storage.atomic_file(destination, fsync=False) as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            if read_only:
                os.chmod(destination, 0o444)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


# --- one job ----------------------------------------------------------------------------------

def execute(plugin, series, work_dir, job_log, job_id, docker="docker"):
    """Prepare in/, run the plug-in, validate out/results.json; return (results, out_dir)."""
    in_dir, out_dir = os.path.join(work_dir, "in"), os.path.join(work_dir, "out")
    for folder in (in_dir, out_dir):  # (no dicom/: our input is read from the storage)
        os.makedirs(folder, exist_ok=True)
    started = time.monotonic()
    prepare_input(series, in_dir, job_log)
    job_log.line(f"Input prepared in {time.monotonic() - started:.2f} s")
    if plugin.type == "CAD":
        run_docker(plugin, job_id, in_dir, out_dir, job_log, docker=docker)
    elif plugin.type == "CAD+remote":
        run_remote(plugin, in_dir, out_dir, work_dir, job_log)
    else:
        raise PluginRunError(f"Unknown plug-in type: {plugin.type}")
    job_log.line("Plug-in execution done. Validating the results")
    wait_for_results(out_dir)
    return read_results(out_dir), out_dir


def run_job(job_id):
    """Run one claimed job to its end: finished with results, or failed with a message."""
    job = db.session.get(PluginJob, job_id)
    if job is None:
        return
    plugin = db.session.get(PluginDefinition, job.plugin_id)
    series, plugin_id = list(job.series), job.plugin_id
    if plugin is not None:
        db.session.expunge(plugin)  # usable without the session
    db.session.rollback()  # no transaction stays open while the plug-in runs
    results_dir = storage.results_dir(job_id)
    work_dir = storage.work_dir(job_id)
    docker = current_app.config.get("PLUGIN_DOCKER_COMMAND", "docker")
    with JobLog(os.path.join(results_dir, LOG_NAME)) as job_log:
        job_log.line(f"Running job ID: {job_id}")
        try:
            if plugin is None:
                raise PluginRunError(f"No such plugin: {plugin_id}")
            job_log.line(f"Plug-in: {plugin.plugin_name} {plugin.version} ({plugin.type})")
            results, out_dir = execute(plugin, series, work_dir, job_log, job_id, docker)
            job_log.line("Copying the result files")
            copy_outputs(out_dir, results_dir, job_log)
            plugin_jobs.finish_job(job_id, results)
            job_log.line("Job execution done.")
        except PluginRunError as exc:
            job_log.line(f"Error: {exc}")
            plugin_jobs.fail_job(job_id, str(exc))
        except Exception as exc:
            log.exception("Plug-in job %s failed unexpectedly", job_id)
            job_log.line(f"Error: {type(exc).__name__}: {exc}")
            plugin_jobs.fail_job(job_id, f"Internal error: {type(exc).__name__}: {_short(exc)}")
        finally:
            if not current_app.config.get("PLUGIN_KEEP_WORK_DIR"):
                _remove_work_dir(work_dir)


def run_standalone(plugin_id, series_arguments, out_dir, keep=False, work_root=None):
    """``run-plugin``: run one plug-in on series without the queue, writing its output
    and log to ``out_dir``. Return (results, work folder or None when removed).

    Raises ApiError for a bad plug-in or series argument, PluginRunError when the run fails.
    """
    import series_access
    plugin = plugin_definitions.get_plugin(plugin_id)
    entries = []
    for text in series_arguments:
        entry = plugin_jobs.parse_series_argument(text)
        pvd = series_access.validate_pvd(entry["partialVolumeDescriptor"])
        series_access.check_pvd_range(series_access.get_series(entry["seriesUid"]), pvd)
        entries.append(entry)
    db.session.expunge(plugin)
    db.session.rollback()
    os.makedirs(out_dir, exist_ok=True)
    root = work_root or storage.root("work")
    os.makedirs(root, exist_ok=True)
    run_id = "run-" + secrets.token_hex(8)
    work_dir = os.path.join(root, run_id)
    docker = current_app.config.get("PLUGIN_DOCKER_COMMAND", "docker")
    try:
        with JobLog(os.path.join(out_dir, LOG_NAME)) as job_log:
            try:
                results, work_out = execute(plugin, entries, work_dir, job_log, run_id, docker)
                copy_outputs(work_out, out_dir, job_log, read_only=False)
                job_log.line("Done.")
            except PluginRunError as exc:
                job_log.line(f"Error: {exc}")
                raise
    finally:
        if not keep:
            _remove_work_dir(work_dir)
    return results, (work_dir if keep else None)


def read_manifest(image_id, docker="docker"):
    """The bytes of /plugin.json in a CAD plug-in's image."""
    return docker_read_file(image_id, "/plugin.json", docker=docker)


def _remove_work_dir(path):
    """Remove a work folder, including read-only files a plug-in left."""
    def writable(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o755)
            os.chmod(target, 0o644)
            func(target)
        except OSError:
            pass
    if os.path.isdir(path):
        shutil.rmtree(path, onerror=writable)


# --- the worker: pool, heartbeats, recovery --------------------------------------------------

def _heartbeat_key(worker_id):
    return "plugin_worker:" + hashlib.sha1(worker_id.encode("utf-8")).hexdigest()


def beat(worker_id):
    """Record that ``worker_id`` is alive (a SystemState row per worker)."""
    key, value = _heartbeat_key(worker_id), {"workerId": worker_id, "heartbeatAt": iso(utcnow())}
    with db.engine.begin() as conn:
        updated = conn.execute(sa.update(SystemState).where(SystemState.key == key)
                               .values(value=value)).rowcount
        if not updated:
            conn.execute(sa.insert(SystemState).values(key=key, value=value))


def _heartbeat_at(worker_id):
    with db.engine.connect() as conn:
        value = conn.execute(sa.select(SystemState.value).where(
            SystemState.key == _heartbeat_key(worker_id))).scalar()
    try:
        return parse_iso(value["heartbeatAt"])
    except (TypeError, KeyError, ValueError):
        return None


def _dead_local_worker(worker_id):
    """Whether ``host:pid`` names a process of this host that no longer exists."""
    host, _, pid = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def recover_interrupted_jobs(worker_id, running=()):
    """Fail jobs left ``processing`` by a worker that stopped: this worker's own claims it
    is not running (a restart), workers of this host whose process is gone, and workers
    anywhere whose heartbeat is older than STALE_AFTER. Return the failed job IDs."""
    now = utcnow()
    failed = []
    rows = db.session.execute(db.select(PluginJob.job_id, PluginJob.claimed_by,
                                        PluginJob.started_at).where(
        PluginJob.queue_state == "processing")).all()
    db.session.rollback()
    for job_id, claimed_by, started_at in rows:
        if job_id in running:
            continue
        claimed_by = claimed_by or ""
        if claimed_by == worker_id or _dead_local_worker(claimed_by):
            interrupted = True
        else:
            seen = [d for d in (_heartbeat_at(claimed_by), started_at) if d is not None]
            interrupted = not seen or max(seen) < now - STALE_AFTER
        if interrupted and plugin_jobs.fail_job(job_id, INTERRUPTED):
            failed.append(job_id)
            log.warning("Job %s (worker %s) was interrupted; marked failed.", job_id, claimed_by)
            try:
                with JobLog(os.path.join(storage.results_dir(job_id), LOG_NAME)) as job_log:
                    job_log.line(INTERRUPTED)
            except OSError:
                pass
            _remove_work_dir(storage.work_dir(job_id))
    return failed


class JobPool:
    """The plug-in jobs one worker process runs at once (PLUGIN_JOB_CONCURRENCY threads)."""

    def __init__(self, app, worker_id):
        self.app = app
        self.worker_id = worker_id
        self.size = max(1, int(app.config.get("PLUGIN_JOB_CONCURRENCY", 1)))
        self.executor = ThreadPoolExecutor(self.size, thread_name_prefix="plugin-job")
        self.futures = {}
        self.last_sweep = 0.0
        self._stop_beating = None

    def sweep(self, force=False):
        if force or time.monotonic() - self.last_sweep > SWEEP_SECONDS:
            self.last_sweep = time.monotonic()
            recover_interrupted_jobs(self.worker_id, running=set(self.futures.values()))

    def reap(self):
        done = [f for f in self.futures if f.done()]
        for future in done:
            job_id = self.futures.pop(future)
            if future.exception() is not None:
                log.error("Job %s crashed its thread: %s", job_id, future.exception())
        if not self.futures:
            self._heartbeats(False)
        return len(done)

    def _run(self, job_id):
        with self.app.app_context():
            try:
                run_job(job_id)
            finally:
                db.session.remove()

    def submit(self, job_id):
        self._heartbeats(True)
        self.futures[self.executor.submit(self._run, job_id)] = job_id

    def _heartbeats(self, on):
        """Keep this worker's heartbeat fresh while it holds jobs."""
        if on and self._stop_beating is None:
            stop = self._stop_beating = threading.Event()
            app, wid = self.app, self.worker_id

            def loop():
                with app.app_context():
                    while not stop.wait(HEARTBEAT_SECONDS):
                        try:
                            beat(wid)
                        except Exception:  # a missed beat is retried
                            log.exception("Heartbeat of %s failed", wid)
            threading.Thread(target=loop, daemon=True, name="plugin-heartbeat").start()
        elif not on and self._stop_beating is not None:
            self._stop_beating.set()
            self._stop_beating = None

    def wait(self, timeout):
        wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)


_POOLS = weakref.WeakKeyDictionary()


def job_pool(app, worker_id):
    """The pool of this app in this process (created on first use, after a recovery sweep)."""
    pool = _POOLS.get(app)
    if pool is None or pool.worker_id != worker_id:
        pool = _POOLS[app] = JobPool(app, worker_id)
        beat(worker_id)
        pool.sweep(force=True)
    return pool


@worker.source
def run_plugin_jobs(worker_id):
    """Worker source: fill free job slots from the queue; wait a poll interval for running
    jobs. Returns whether anything was taken, finished or is still running."""
    app = current_app._get_current_object()
    pool = job_pool(app, worker_id)
    pool.sweep()
    progressed = pool.reap() > 0
    while len(pool.futures) < pool.size:
        job_id = plugin_jobs.claim_next_job(worker_id)
        if job_id is None:
            break
        pool.submit(job_id)
        progressed = True
    if progressed:
        return True
    if pool.futures:
        pool.wait(app.config["WORKER_POLL_INTERVAL"])
        return True
    return False


# --- plug-in displays -----------------------------------------------------------------------

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


_VALIDATOR = []


def _results_validator():
    if not _VALIDATOR:
        _VALIDATOR.append(Draft7Validator(load_schema("plugin-results")))
    return _VALIDATOR[0]
