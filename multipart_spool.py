"""A streaming multipart reader that writes file parts straight to files.

Werkzeug's parser compiles two regular expressions per request (one per boundary) and
copies every chunk through a growing buffer; for uploads of DICOM files that is most of the
per-request parsing cost. This reader finds the delimiter with ``bytes.find``, reads the body
in large chunks and writes each file part's bytes to its sink without building the part in
memory. Two uses: multipart/form-data (series uploads), where file parts are spooled and
other parts (form fields) are read, bounded in size, and dropped (``spool_upload`` spools
the current request's upload into a folder with it, one file per part); and
multipart/related (DICOMweb STOW-RS, ``on_part``), where every part is handed over with its
headers.
"""
import os

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header

from errors import ApiError

HEADER_MAX_BYTES = 16 * 1024
FIELD_NAME = "files"  # the only file field an upload may use
UPLOAD_BUFFER = 1024 * 1024


class MultipartError(ValueError):
    """Raised when the body is not well-formed multipart/form-data (a 400)."""


class MultipartTooLarge(Exception):
    """Raised when a part or the number of parts exceeds its bound (a 413)."""


class _Reader:
    """A buffer over a stream, refilled in ``chunk``-sized reads."""

    def __init__(self, stream, chunk):
        self.stream = stream
        self.chunk = chunk
        self.buf = b""
        self.pos = 0
        self.eof = False

    def fill(self):
        """Read one more chunk (keeping the unread bytes); False at the end of the stream."""
        if self.eof:
            return False
        data = self.stream.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data if self.pos < len(self.buf) else data
        self.pos = 0
        return True

    def need(self, count):
        """Make ``count`` unread bytes available if the stream has them."""
        while len(self.buf) - self.pos < count and self.fill():
            pass
        return len(self.buf) - self.pos >= count


def parse(stream, boundary, on_file=None, chunk=1024 * 1024, field_max=4 * 1024 * 1024,
          max_parts=None, on_part=None):
    """Read a multipart body from ``stream``.

    ``on_file(name)`` is called for each file part (a part whose Content-Disposition has a
    ``filename``) with its field name and returns an object with ``write(bytes)``; the
    part's bytes are written to it. With ``on_part(headers)`` instead, every part is a
    file: it is called with the part's headers (lower-case name -> value) and returns the
    sink. Returns the number of parts read.

    Raises
    ------
    MultipartError
        On a malformed body (no boundary, bad headers, body ending before the last
        boundary).
    MultipartTooLarge
        When a non-file part exceeds ``field_max`` bytes or there are more than
        ``max_parts`` parts.
    """
    if not boundary:
        raise MultipartError("no boundary")
    reader = _Reader(stream, chunk)
    dash_boundary = b"--" + boundary
    delimiter = b"\r\n" + dash_boundary
    # The first boundary may start the body or follow a preamble.
    while True:
        if reader.buf.startswith(dash_boundary):
            reader.pos = len(dash_boundary)
            break
        found = reader.buf.find(delimiter)
        if found >= 0:
            reader.pos = found + len(delimiter)
            break
        if len(reader.buf) > HEADER_MAX_BYTES or not reader.fill():
            raise MultipartError("no boundary")
    parts = 0
    keep = len(delimiter) - 1
    while True:
        # After a boundary: "--" ends the body, else optional blanks and a line break.
        if not reader.need(2):
            raise MultipartError("unexpected end of body")
        if reader.buf[reader.pos:reader.pos + 2] == b"--":
            return parts
        while True:
            end = reader.buf.find(b"\r\n", reader.pos)
            if end >= 0 or len(reader.buf) - reader.pos > HEADER_MAX_BYTES or not reader.fill():
                break
        if end < 0 or reader.buf[reader.pos:end].strip(b" \t"):
            raise MultipartError("bad boundary line")
        reader.pos = end + 2
        parts += 1
        if max_parts is not None and parts > max_parts:
            raise MultipartTooLarge("too many parts")
        sink = _part_sink(reader, on_file, field_max, on_part)
        # The part's bytes run up to the next delimiter.
        while True:
            found = reader.buf.find(delimiter, reader.pos)
            if found >= 0:
                sink.write(memoryview(reader.buf)[reader.pos:found])
                reader.pos = found + len(delimiter)
                break
            safe = len(reader.buf) - keep
            if safe > reader.pos:
                sink.write(memoryview(reader.buf)[reader.pos:safe])
                reader.pos = safe
            if not reader.fill():
                raise MultipartError("unexpected end of body")


def _part_sink(reader, on_file, field_max, on_part=None):
    """Read one part's headers; return where its bytes go."""
    # need() may move the unread bytes to the start of a new buffer: read pos after it.
    if reader.need(2) and reader.buf[reader.pos:reader.pos + 2] == b"\r\n":
        block, reader.pos = b"", reader.pos + 2
    else:
        while True:
            end = reader.buf.find(b"\r\n\r\n", reader.pos)
            if end >= 0:
                break
            if len(reader.buf) - reader.pos > HEADER_MAX_BYTES or not reader.fill():
                raise MultipartError("bad part headers")
        if end - reader.pos > HEADER_MAX_BYTES:
            raise MultipartError("part headers too long")
        block, reader.pos = reader.buf[reader.pos:end], end + 4
    headers = {}
    try:
        # A related part may go without headers (its type is the body's ``type``).
        lines = block.decode().split("\r\n") if block or on_part is None else ()
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise MultipartError("bad part header")
            headers[name.strip().lower()] = value.strip()
    except UnicodeDecodeError:
        raise MultipartError("bad part header") from None
    if on_part is not None:
        return on_part(headers)
    _kind, options = parse_options_header(headers.get("content-disposition", ""))
    if "filename" in options:
        return on_file(options.get("name", ""))
    return _BoundedSink(field_max)


class _BoundedSink:
    """Where a form field's bytes go: counted, bounded, dropped."""

    def __init__(self, limit):
        self.limit = limit
        self.size = 0

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise MultipartTooLarge("form field too large")


# --- spooling an upload ----------------------------------------------------------------

class _LimitedFile:
    """A spool file that refuses to grow beyond the per-file upload limit (413)."""

    def __init__(self, path, limit):
        self.path = path
        self.limit = limit
        self.size = 0
        self.fh = open(path, "w+b")

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise RequestEntityTooLarge()
        return self.fh.write(data)

    def seek(self, *args):
        return self.fh.seek(*args)

    def read(self, *args):
        return self.fh.read(*args)

    def tell(self):
        return self.fh.tell()

    def close(self):
        self.fh.close()


def spool_upload(folder, prefix=""):
    """Stream the multipart body into ``folder``: one file per part, never in memory.

    Returns the spooled paths of the ``files`` parts in order. Any other file field, a
    malformed body or a file above UPLOAD_FILE_SIZE_MAX_BYTES is refused.
    """
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
    limit = current_app.config["UPLOAD_FILE_SIZE_MAX_BYTES"]
    opened = []

    def on_file(name):
        if name != FIELD_NAME:
            raise ApiError(400, f'Uploaded files must use the field name "{FIELD_NAME}".')
        spooled = _LimitedFile(os.path.join(folder, f"{prefix}{len(opened) + 1:06d}"), limit)
        opened.append(spooled)
        return spooled

    boundary = request.mimetype_params.get("boundary", "").encode("ascii", "replace")
    if not boundary:
        raise ApiError(400, "The multipart body could not be parsed.")
    try:
        # 1 MiB reads: werkzeug's default 64 KiB halves the throughput of large uploads.
        parse(request.stream, boundary, on_file, chunk=UPLOAD_BUFFER, field_max=4 * UPLOAD_BUFFER,
              max_parts=current_app.config["ARCHIVE_MAX_ENTRIES"])
    except (RequestEntityTooLarge, MultipartTooLarge):
        raise ApiError(413, "request entity too large") from None
    except MultipartError:
        raise ApiError(400, "The multipart body could not be parsed.") from None
    finally:
        for spooled in opened:
            spooled.close()
    return [spooled.path for spooled in opened]
