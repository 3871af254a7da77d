"""Image server (/rs) figures beside the in-process decoding floor measured in the same run.

    .venv/bin/python bench/rs.py [--slices 200] [--rounds 3] [--sockets 50] [--seconds 5]

The series is ../shared/bench/gen_dicom.py's ct200 (512x512 int16 CT, Rescale Intercept
-1024), written with its own ``base``/``write`` (``--slices`` of them) into a scratch data
directory and stored as a series. The floor is pydicom ``dcmread`` + ``pixel_array`` of the
same files, in-process, files in the page cache. Each round starts gunicorn (the served
gunicorn.conf.py, one worker so that the re-open meets the cache of the first) and reports:
  WebSocket first open after start: first-slice ms, last-slice ms   (goals <= 100 ms, <= 3x floor)
  WebSocket re-open (cache): last-slice ms                          (goal <= 1x floor)
  HTTP volume MB/s (identity encoding) beside the floor's MB/s
  metadata p50 ms on a re-open
  GET /api/status requests/s with --sockets viewer sockets open vs none (wrk; goal >= 0.8x)
  worker RSS idle / while streaming, beside the cache limit and one volume's bytes
Figures are medians over --rounds; ratios are ours / floor.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT.parent / "shared" / "bench")]
from loadgen import wait_up, wrk  # noqa: E402

import gen_dicom  # noqa: E402
from app import create_app  # noqa: E402
from tests.sample_series import store_series  # noqa: E402

METADATA_REQUESTS = 50


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_ct(out, slices):
    """gen_dicom.py's ct200 series, ``slices`` images."""
    rng = np.random.default_rng(42)
    os.makedirs(out, exist_ok=True)
    ds = gen_dicom.base(512, 512, "CT")
    ds.PatientName, ds.PatientID = "CT^Volume", "CT0001"
    ds.StudyInstanceUID = gen_dicom.generate_uid(gen_dicom.ROOT)
    ds.SeriesInstanceUID = gen_dicom.generate_uid(gen_dicom.ROOT)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    paths = []
    for i in range(slices):
        ds.SOPInstanceUID = gen_dicom.generate_uid(gen_dicom.ROOT)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        paths.append(os.path.join(out, f"ct{i:04d}.dcm"))
        gen_dicom.write(ds, paths[-1],
                        rng.integers(0, 2000, size=(512, 512), dtype=np.int16).tobytes())
    return paths, str(ds.SeriesInstanceUID)


def floor_seconds(paths):
    """pydicom read + pixel_array of every file (page cache warm)."""
    started = time.perf_counter()
    for path in paths:
        pydicom.dcmread(path).pixel_array
    return time.perf_counter() - started


def prepare(data_dir, paths):
    env = {**os.environ, "CIRCUS_DATA_DIR": data_dir}
    env.pop("DATABASE_URL", None)
    flask = [sys.executable, "-m", "flask", "--app", "app"]
    subprocess.run(flask + ["init-db"], env=env, cwd=ROOT, check=True, capture_output=True)
    token = subprocess.run(flask + ["add-permanent-token", "circus"], env=env, cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()[-1]
    with create_app({"CIRCUS_DATA_DIR": data_dir, "DATABASE_URL": None}).app_context():
        uid = store_series(paths)
    return env, token, uid


class Gunicorn:
    def __init__(self, env, log):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{self.port}",
             "--no-control-socket", "app:create_app()"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_up(self.port, "/api/status")

    def worker_pid(self):
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def rss_mb(self):
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def open_socket(port, token):
    return websocket.create_connection(f"ws://127.0.0.1:{port}/rs/ws/volume?token={token}",
                                       timeout=60)


def read_frame(sock):
    """One unfragmented server frame's payload, read straight off the socket (as a browser
    does natively): websocket-client assembles frames in Python and, for 512 KB slices,
    reads slower than the server sends (``--client websocket-client`` measures with it)."""
    head = _read_exactly(sock, 2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(_read_exactly(sock, 2), "big")
    elif length == 127:
        length = int.from_bytes(_read_exactly(sock, 8), "big")
    return _read_exactly(sock, length)


def _read_exactly(sock, size):
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the socket closed")
        got += n
    return buffer


def transfer(ws, uid, transfer_id, slices, client="raw"):
    """(first-slice ms, last-slice ms) of one BEGIN_TRANSFER."""
    started = time.perf_counter()
    ws.send_binary(json.dumps({"messageType": "BEGIN_TRANSFER", "transferId": transfer_id,
                               "seriesUid": uid}).encode() + b"\n")
    first = None
    for _ in range(slices):
        if client == "raw":
            read_frame(ws.sock)
        else:
            ws.recv()
        first = first or (time.perf_counter() - started) * 1000
    return first, (time.perf_counter() - started) * 1000


def http_volume_seconds(port, uid, token):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request("GET", f"/rs/series/{uid}/volume", headers={"Authorization": f"Bearer {token}"})
    res = conn.getresponse()
    size = len(res.read())
    return time.perf_counter() - started, size


def metadata_p50(port, uid):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(METADATA_REQUESTS):
        started = time.perf_counter()
        conn.request("GET", f"/rs/series/{uid}/metadata")
        conn.getresponse().read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def one_round(env, token, uid, args, floor_s, log):
    server = Gunicorn(env, log)
    try:
        figures = {"rss idle MB": server.rss_mb()}
        peak = [0.0]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], server.rss_mb())
                time.sleep(0.05)
        sampler = threading.Thread(target=sample)
        sampler.start()
        ws = open_socket(server.port, token)
        figures["ws first slice ms"], figures["ws last slice ms"] = \
            transfer(ws, uid, "1", args.slices, args.client)
        sampling.set()
        sampler.join()
        figures["rss streaming MB"] = peak[0]
        figures["ws re-open last slice ms"] = transfer(ws, uid, "2", args.slices, args.client)[1]
        ws.close()
        seconds, size = http_volume_seconds(server.port, uid, token)
        figures["http volume MB/s"] = size / seconds / 1e6
        figures["metadata p50 ms"] = metadata_p50(server.port, uid)
        if shutil.which("wrk"):
            url = f"http://127.0.0.1:{server.port}/api/status"
            figures["status rps, no socket"] = wrk(url, None, args.seconds, 4)[0]
            sockets = [open_socket(server.port, token) for _ in range(args.sockets)]
            for i, viewer in enumerate(sockets[:5]):  # a few stream while wrk runs
                viewer.send_binary(json.dumps({"messageType": "BEGIN_TRANSFER",
                                               "transferId": str(i),
                                               "seriesUid": uid}).encode() + b"\n")
            figures[f"status rps, {args.sockets} sockets"] = wrk(url, None, args.seconds, 4)[0]
            for viewer in sockets:
                viewer.close()
        return figures
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--client", choices=("raw", "websocket-client"), default="raw",
                        help="how the slices are read: frames off the socket, or websocket-client")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-rs-")
    try:
        paths, _ = make_ct(os.path.join(scratch, "ct"), args.slices)
        env, token, uid = prepare(os.path.join(scratch, "data"), paths)
        floor_seconds(paths)  # page cache
        rounds, floors = [], []
        with open(os.path.join(scratch, "gunicorn.log"), "wb") as log:
            for _ in range(args.rounds):
                floors.append(floor_seconds(paths))
                rounds.append(one_round(env, token, uid, args, floors[-1], log))
        floor_ms = statistics.median(floors) * 1000
        volume_mb = args.slices * 512 * 512 * 2 / 1e6
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"{args.slices} slices of 512x512 int16 ({volume_mb:.0f} MB), "
              f"median of {args.rounds} rounds")
        print(f"floor (pydicom read + pixel_array): {floor_ms:.0f} ms, "
              f"{volume_mb / floor_ms * 1000:.0f} MB/s")
        print(f"ws first slice:        {med['ws first slice ms']:8.1f} ms   (goal <= 100)")
        print(f"ws last slice:         {med['ws last slice ms']:8.1f} ms   "
              f"{med['ws last slice ms'] / floor_ms:.2f}x floor (goal <= 3)")
        print(f"ws re-open last slice: {med['ws re-open last slice ms']:8.1f} ms   "
              f"{med['ws re-open last slice ms'] / floor_ms:.2f}x floor (goal <= 1)")
        print(f"http volume:           {med['http volume MB/s']:8.0f} MB/s "
              f"{med['http volume MB/s'] / (volume_mb / floor_ms * 1000):.2f}x floor")
        print(f"metadata p50:          {med['metadata p50 ms']:8.2f} ms")
        if "status rps, no socket" in med:
            base, loaded = med["status rps, no socket"], med[f"status rps, {args.sockets} sockets"]
            print(f"/api/status:           {base:8.0f} req/s alone, {loaded:.0f} with "
                  f"{args.sockets} sockets: {loaded / base:.2f}x (goal >= 0.8)")
        else:
            print("/api/status: wrk not installed, skipped")
        print(f"worker RSS:            {med['rss idle MB']:8.0f} MB idle, "
              f"{med['rss streaming MB']:.0f} MB streaming; cache limit "
              f"{int(os.environ.get('CIRCUS_RS_CACHE_BYTES', 1024**3)) / 1e6:.0f} MB "
              f"+ one volume {volume_mb:.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
