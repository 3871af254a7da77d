"""The HTTP runner of CAD+remote plug-ins (API.md 5.5): the input is POSTed as multipart,
the progress is read as server-sent events, and the result tar is fetched and unpacked.

Nothing a remote server returns can write outside ``out/``: the archive is checked entry
by entry (no absolute paths, ``..``, links or devices) before anything is extracted.
"""
import json
import os
import re
import secrets
import shutil
import tarfile

import requests

import storage
from plugins import definitions
from plugins.job_log import PluginRunError, short_message

REMOTE_ADAPTERS = ("default", "defaultHttpAdapter")
REMOTE_DEFAULT_TIMEOUT = 300  # seconds until the headers of POST <endpoint>/run (5.5)
REMOTE_RESULT_TIMEOUT = 30  # seconds until the headers of GET <endpoint>/result/<id>
REMOTE_ARCHIVE_MAX_BYTES = 8 * 1024 ** 3
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,200}$")


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
    return endpoint, definitions.remote_secret(plugin), (int(timeout) if timeout else None)


def _remote_failed(message):
    return PluginRunError(f"Remote CAD failed: {message}")


def run(plugin, run_id, in_dir, out_dir, work_dir, job_log, config):
    """The runner of "CAD+remote" plug-ins (``plugins.runner.RUNNERS``): the HTTP protocol
    of 5.5; the result tar ends in out/."""
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
        raise _remote_failed(f"Internal error: {short_message(exc)}") from None
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
            error = f"Error reading server response: {short_message(exc)}"
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
        raise _remote_failed(f"Failed to fetch result data: {short_message(exc)}") from None
    try:
        extract_tar(archive, out_dir)
    finally:
        os.unlink(archive)


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
        raise _remote_failed(
            f"The result archive cannot be read: {short_message(exc)}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _remote_failed(
                f"The result archive cannot be read: {short_message(exc)}") from None
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
