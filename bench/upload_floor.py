"""The least a durable upload can cost under our gunicorn: a bare WSGI app (no Flask, no
token, no multipart parsing, no database) that reads the request body in 1 MiB reads,
writes it to a temporary file, fsyncs it, renames it into place and fsyncs the folder,
then answers 201 -- the file work /single must do, and nothing else.

bench/ingest.py serves it with the served configuration (gunicorn.conf.py) beside ours and
Orthanc, so that /single's ratio to Orthanc can be read against what gunicorn itself allows.
``UPLOAD_FLOOR_DIR`` names the folder the files go to.
"""
import os
import uuid

FOLDER = os.environ.get("UPLOAD_FLOOR_DIR", "/tmp/upload-floor")
CHUNK = 1024 * 1024


def app(environ, start_response):
    """POST: store the body durably; anything else: 200 (the readiness probe)."""
    if environ["REQUEST_METHOD"] != "POST":
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    os.makedirs(FOLDER, exist_ok=True)
    name = os.path.join(FOLDER, uuid.uuid4().hex)
    stream = environ["wsgi.input"]
    fd = os.open(name + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while True:
            data = stream.read(CHUNK)
            if not data:
                break
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(name + ".tmp", name)
    folder = os.open(FOLDER, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    start_response("201 Created", [("Content-Length", "0")])
    return [b""]
