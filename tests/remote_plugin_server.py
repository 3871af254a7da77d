"""A tiny remote CAD plug-in server on loopback, speaking the HTTP protocol of API.md 5.5.

``POST /run`` (multipart, field ``files``) reads the uploaded ``0.mhd``/``0.raw``, computes
the voxel mean and answers an SSE stream; ``GET /result/<id>`` answers a tar with a
``results.json`` holding that mean as a lesion candidate's confidence. ``server.mode``
selects a misbehaviour for the bad-input tests:

ok, gzip, no_finished, error_event, timeout, http500, no_request_id, drop, tar_traversal,
tar_absolute, tar_symlink, malformed, invalid_results, result404, slow_result
"""
import email
import email.policy
import io
import json
import tarfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DTYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "<u2", "MET_SHORT": "<i2"}


def parse_mhd(text):
    return dict(line.split(" = ", 1) for line in text.strip().splitlines())


def voxel_mean(mhd_text, raw):
    header = parse_mhd(mhd_text)
    dims = [int(d) for d in header["DimSize"].split()]
    voxels = np.frombuffer(raw, dtype=DTYPES[header["ElementType"]])
    if voxels.size != dims[0] * dims[1] * dims[2]:
        raise ValueError("raw size does not match DimSize")
    return float(voxels.mean()), dims


def parse_multipart(content_type, body):
    """``{filename: bytes}`` of the parts named ``files`` of a multipart/form-data body."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    files = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part[2:].partition(b"\r\n\r\n")
        disposition = email.message_from_bytes(head + b"\r\n\r\n",
                                               policy=email.policy.HTTP)
        if disposition.get_param("name", header="content-disposition") == "files":
            files[disposition.get_filename()] = data[:-2]  # the CRLF before the boundary
    return files


def results_tar(files, gzip=False, extra=()):
    """A tar archive (bytes) of ``{name: bytes}`` plus raw TarInfo entries in ``extra``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"evil" if info.isfile() else b""))
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    @property
    def plugin(self):
        return self.server.plugin

    def _authorised(self):
        if self.headers.get("Authorization") != f"Bearer {self.plugin.secret}":
            self._plain(401, b"bad secret")
            return False
        return True

    def _plain(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, text):
        data = text.encode("utf-8")
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def do_POST(self):
        plugin, mode = self.plugin, self.plugin.mode
        if self.path != "/run" or not self._authorised():
            return
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        files = parse_multipart(self.headers["Content-Type"], body)
        plugin.received.append({"files": files, "headers": dict(self.headers)})
        if mode == "timeout":
            time.sleep(plugin.delay)
            return self._plain(200, b"too late")
        if mode == "http500":
            return self._plain(500, b"the detector is broken")
        with plugin.lock:
            plugin.active += 1
            plugin.max_active = max(plugin.max_active, plugin.active)
        try:
            time.sleep(plugin.run_delay)
        finally:
            with plugin.lock:
                plugin.active -= 1
        mean, dims = voxel_mean(files["0.mhd"].decode(), files["0.raw"])
        request_id = uuid.uuid4().hex
        plugin.results[request_id] = (mean, dims)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if mode != "no_request_id":
            self.send_header("X-Request-ID", request_id)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk('event: log\ndata: "Loaded 0.raw"\n\n: a comment line\n')
        if mode == "drop":
            self.wfile.flush()
            self.connection.shutdown(2)  # gone, mid-stream, without the last chunk
            self.close_connection = True
            return
        self._chunk(f'event: log\ndata: "mean {mean:.3f}"\n\n')
        if mode == "error_event":
            self._chunk('event: error\ndata: "The lesion detector crashed"\n\n')
        if mode != "no_finished":
            self._chunk("event: finished\ndata: null\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        plugin, mode = self.plugin, self.plugin.mode
        if not self.path.startswith("/result/") or not self._authorised():
            return
        entry = plugin.results.get(self.path[len("/result/"):])
        if entry is None or mode == "result404":
            return self._plain(404, b"no such result")
        if mode == "slow_result":
            time.sleep(plugin.delay)
        mean, dims = entry
        results = {"results": {"lesionCandidates": [{
            "volumeId": 0, "location": [dims[0] // 2, dims[1] // 2, dims[2] // 2],
            "confidence": mean, "rank": 1}], "voxelMean": mean, "dimension": dims},
            "metadata": {"displayOptions": [{"volumeId": 0, "window": {"level": 40,
                                                                        "width": 400}}]}}
        files = {"results.json": json.dumps(results).encode(),
                 "images/summary.txt": f"mean={mean}\n".encode()}
        extra = []
        if mode == "malformed":
            files["results.json"] = b'{"results": {"lesionCandidates": [ oops'
        elif mode == "invalid_results":
            files["results.json"] = json.dumps(
                {"results": {"lesionCandidates": [{"volumeId": -1}]}}).encode()
        elif mode == "tar_traversal":
            files["../../escaped.txt"] = b"I escaped"
        elif mode == "tar_absolute":
            files["/tmp/circus-absolute-escape.txt"] = b"I escaped"
        elif mode == "tar_symlink":
            link = tarfile.TarInfo("images/passwd")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            extra.append(link)
        data = results_tar(files, gzip=mode == "gzip", extra=extra)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that gave up (timeouts) are part of the tests


class RemotePlugin:
    """The server and what it saw; use as a context manager (or call start/stop)."""

    def __init__(self, secret="s3cret", mode="ok", delay=3.0):
        self.secret, self.mode, self.delay = secret, mode, delay
        self.received, self.results = [], {}
        self.run_delay, self.active, self.max_active = 0.0, 0, 0
        self.lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.plugin = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
