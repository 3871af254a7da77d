"""Ingest benchmark: our DICOM import beside Orthanc (the peer), same data, same run.

Data: ``../shared/bench/gen_dicom.py`` (200-slice 512x512 CT, 10,000 small instances in
1,000 series, 9,000 one-instance series), generated once under ``--perf``.
Our server: gunicorn with the served configuration (gunicorn.conf.py) on loopback plus one
``flask --app app worker`` process. Orthanc: ``../shared/bench/orthanc.sh`` on 127.0.0.1:8042.
Each measurement starts both systems on empty storage.

Figures (ratios ours / Orthanc unless said):
  zip-ct, zip-small   one request with a zip (the CT; ``--small`` small instances),
                      instances/s until the import is finished (our task polled);
                      medians of --rounds, ours and Orthanc fresh in turn (--trees: several
                      checkouts in turn, each also over the first)
  single-ct           /single from one client: MB/s         (Orthanc: POST /instances)
  single-small        /single from one client: instances/s
  (floor)             beside them, the same uploads to ``bench/upload_floor.py``: a bare WSGI
                      app under the same gunicorn settings that only stores the body durably
                      (what gunicorn and the file work alone cost; no Flask, token, DB)
  (flask)             and the same files to the shared floor app's naive ingest (Flask +
                      Flask-SQLAlchemy + SQLite, fsync on), under the same gunicorn settings
  cli-small           ``flask --app app import-series`` from a folder: instances/s, shown
                      beside zip-small over HTTP
  rss                 peak RSS of gunicorn master + workers + worker process while ingesting
                      the CT zip and a ~1 GB zip, over the idle RSS; and the RSS after
                      19,000 small instances over the RSS after the first 1,000

Usage (from the project root)::

    .venv/bin/python bench/ingest.py                      # everything (~10 min on 2 cores)
    .venv/bin/python bench/ingest.py --only zip,single --small 1000
    .venv/bin/python bench/ingest.py --only zip --trees ../before,.   # before/after
"""
import argparse
import atexit
import glob
import http.client
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zipfile

from loadgen import wait_up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "bench")
ORTHANC_AUTH = "Basic " + __import__("base64").b64encode(b"bench:bench").decode()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- data -------------------------------------------------------------------------------

def ensure_data(perf):
    data = os.path.join(perf, "data")
    if not os.path.isdir(os.path.join(data, "extra9k")):
        print("generating synthetic data (once)...", flush=True)
        subprocess.run([sys.executable, os.path.join(SHARED, "gen_dicom.py"), data], check=True)
    return data


def files_of(folder, count=None):
    return sorted(glob.glob(os.path.join(folder, "*.dcm")))[:count]


def make_zip(path, files):
    if not os.path.exists(path):
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED) as archive:
            for n, name in enumerate(files):
                archive.write(name, f"upload/{n // 500}/{os.path.basename(name)}")
        os.replace(path + ".tmp", path)
    return path


def make_big_zip(path, ct_files, copies):
    """About copies x 103 MB: the CT with new series/instance UIDs per copy."""
    if os.path.exists(path):
        return path
    import pydicom
    from pydicom.uid import generate_uid
    datasets = [pydicom.dcmread(f) for f in ct_files]
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED) as archive:
        for copy in range(copies):
            series = generate_uid()
            for n, ds in enumerate(datasets):
                ds.SeriesInstanceUID = series
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                archive.writestr(f"copy{copy}/{n:04d}.dcm", buffer.getvalue())
    os.replace(path + ".tmp", path)
    return path


# --- processes --------------------------------------------------------------------------

def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


_FOLDERS = []


def new_folder(perf, name):
    """A data folder never used before, removed when the run ends: this file system skips
    inodes freed in the last minutes when it allocates one, so files created right after
    the previous round's thousands were removed cost ~0.5 ms each instead of ~20 us (the
    ingest figures of a round swung 2x with it)."""
    folder = os.path.join(perf, f"{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(folder)
    _FOLDERS.append(folder)
    return folder


atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _FOLDERS])


class Ours:
    """gunicorn (served configuration) + one worker process on a fresh data directory, run
    from ``root``: this checkout, or another one (``--trees``: a worktree of an earlier
    commit, for before/after figures from the same client and data)."""

    def __init__(self, perf, root=ROOT):
        self.dir = new_folder(perf, "circus")
        # Per-file upload limit raised for the ~1 GB archive (the default is 200 MiB).
        self.env = {**os.environ, "CIRCUS_DATA_DIR": self.dir, "CIRCUS_WORKER_POLL_INTERVAL": "0.05",
                    "CIRCUS_UPLOAD_FILE_SIZE_MAX_BYTES": str(4 * 1024 ** 3)}
        flask = [sys.executable, "-m", "flask", "--app", "app"]
        subprocess.run(flask + ["init-db"], cwd=root, env=self.env, check=True, capture_output=True)
        out = subprocess.run(flask + ["add-permanent-token", "circus"], cwd=root, env=self.env,
                             check=True, capture_output=True, text=True).stdout
        self.token = out.strip().splitlines()[-1]
        self.port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}", "app:create_app()"],
            cwd=root, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.worker = subprocess.Popen(flask + ["worker"], cwd=root, env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(self.port, "/api/status")

    def headers(self, extra=None):
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def request(self, method, path, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(method, path, body=body, headers=headers or self.headers())
        res = conn.getresponse()
        data = res.read()
        if own:
            conn.close()
        return res.status, data

    def pids(self):
        return [self.server.pid, *children(self.server.pid), self.worker.pid]

    def rss_kb(self):
        return sum(rss_kb(pid) for pid in self.pids())

    def upload_zip(self, path):
        """POST the archive as one multipart upload; wait for the task; return seconds."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                f"filename=\"{os.path.basename(path)}\"\r\nContent-Type: application/zip\r\n\r\n"
                ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + os.path.getsize(path) + len(tail)

        def body():
            yield head
            with open(path, "rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    yield chunk
            yield tail
        start = time.perf_counter()
        status, data = self.request("POST", "/api/series/domain/default", body=body(),
                                    headers=self.headers({
                                        "Content-Type": f"multipart/form-data; boundary={boundary}",
                                        "Content-Length": str(size)}))
        if status != 201:
            raise RuntimeError(f"upload: {status} {data[:200]}")
        task_id = json.loads(data)["taskId"]
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while True:
            status, data = self.request("GET", f"/api/tasks/{task_id}", conn=conn)
            task = json.loads(data)
            if task["status"] != "processing":
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        if task["status"] != "finished":
            raise RuntimeError(f"task failed: {task}")
        return elapsed, task["finishedMessage"]

    def single(self, files):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        start = time.perf_counter()
        for name in files:
            with open(name, "rb") as fh:
                content = fh.read()
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                    f"filename=\"x.dcm\"\r\nContent-Type: application/dicom\r\n\r\n").encode() \
                + content + f"\r\n--{boundary}--\r\n".encode()
            status, data = self.request("POST", "/api/series/domain/default/single", body=body,
                                        headers=self.headers({
                                            "Content-Type": f"multipart/form-data; boundary={boundary}"}),
                                        conn=conn)
            if status != 201:
                raise RuntimeError(f"single: {status} {data[:200]}")
        return time.perf_counter() - start

    def cli_import(self, folder):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "import-series",
                              "-d", "default", folder], cwd=ROOT, env=self.env, check=True,
                             capture_output=True, text=True).stdout
        return time.perf_counter() - start, out.strip().splitlines()[-1]

    def stop(self):
        for proc in (self.worker, self.server):
            proc.terminate()
        for proc in (self.worker, self.server):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


class Orthanc:
    port = 8042
    auth = ORTHANC_AUTH

    def __init__(self, perf):
        self.env = {**os.environ, "PERF": new_folder(perf, "orthanc")}
        subprocess.run(["bash", os.path.join(SHARED, "orthanc.sh"), "start"], env=self.env,
                       check=True, capture_output=True)

    def post(self, body, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/instances", body=body, headers={"Authorization": self.auth})
        res = conn.getresponse()
        data = res.read()
        if own:
            conn.close()
        if res.status != 200:
            raise RuntimeError(f"{type(self).__name__}: {res.status} {data[:200]}")
        return data

    def upload_zip(self, path):
        start = time.perf_counter()
        with open(path, "rb") as fh:
            self.post(fh)
        return time.perf_counter() - start

    def single(self, files):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        start = time.perf_counter()
        for name in files:
            with open(name, "rb") as fh:
                self.post(fh.read(), conn)
        return time.perf_counter() - start

    def stop(self):
        subprocess.run(["bash", os.path.join(SHARED, "orthanc.sh"), "stop"], env=self.env,
                       capture_output=True)


# --- measurements ---------------------------------------------------------------------------

def fresh(perf):
    return Ours(perf), Orthanc(perf)


def report(label, ours, peer, unit, goal=None):
    ratio = ours / peer if peer else float("nan")
    line = f"{label:<14} ours {ours:9.1f} {unit:<12} orthanc {peer:9.1f} {unit:<12} ratio {ratio:5.2f}"
    if goal:
        line += f"  (goal >= {goal})"
    print(line, flush=True)


def tree_label(root):
    """A checkout as the figures name it: its short commit."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True)
    return out.stdout.strip() or os.path.basename(root)


def bench_zip(perf, data, small, rounds, trees):
    """Each zip ``rounds`` times, each tree and Orthanc fresh in turn; medians. With several
    trees, each one's median is also given over the first tree's (a before/after figure)."""
    ct = make_zip(os.path.join(perf, "ct200.zip"), files_of(os.path.join(data, "ct200")))
    sm = make_zip(os.path.join(perf, f"small{small}.zip"),
                  files_of(os.path.join(data, "small10k"), small))
    for label, path, count in (("zip-ct", ct, 200), ("zip-small", sm, small)):
        ours = {root: [] for root in trees}
        peer_rates = []
        for _ in range(rounds):
            for root in trees:
                server = Ours(perf, root)
                try:
                    server.single(files_of(os.path.join(data, "extra9k"), 1))  # warm up
                    seconds, message = server.upload_zip(path)
                finally:
                    server.stop()
                ours[root].append(count / seconds)
            peer = Orthanc(perf)
            try:
                peer_rates.append(count / peer.upload_zip(path))
            finally:
                peer.stop()
        peer_median = statistics.median(peer_rates)
        first = statistics.median(ours[trees[0]])
        for root in trees:
            rates = ours[root]
            name = label if len(trees) == 1 else f"{label} {tree_label(root)}"
            report(name, statistics.median(rates), peer_median, "inst/s", 1.5)
            note = f"ours: {message}; rounds {', '.join(f'{r:.0f}' for r in rates)}"
            if root != trees[0]:
                note += f"; over {tree_label(trees[0])}: {statistics.median(rates) / first:.2f}"
            print(f"{'':14} {note}", flush=True)


class UploadFloor(Ours):
    """bench/upload_floor.py under the same gunicorn settings: the body stored durably, no
    more. Uses Ours' multipart client so that both get the same bytes."""

    def __init__(self, perf):
        folder = new_folder(perf, "upload-floor")
        self.env = {**os.environ, "UPLOAD_FLOOR_DIR": folder}
        self.token = "unused"
        self.port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}",
             "bench.upload_floor:app"], cwd=ROOT, env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.worker = None
        wait_up(self.port, "/")

    def stop(self):
        self.server.terminate()
        self.server.wait(timeout=30)


class FlaskFloor(Orthanc):
    """The shared floor app's naive ingest (``POST /instances`` of ../shared/bench/floor_app.py:
    token check, pydicom header parse, file write with fsync (FLOOR_FSYNC=1, as Orthanc),
    instance row, series upsert, commit) under the same gunicorn settings as ours: the
    fastest a Flask + Flask-SQLAlchemy + SQLite ingest answers here. Posts raw bodies,
    as to Orthanc (whose client it shares)."""
    auth = "Bearer secret"

    def __init__(self, perf):
        folder = new_folder(perf, "flask-floor")
        # ROOT after SHARED: gunicorn.conf.py's post_worker_init imports dicom.transfer.
        self.env = {**os.environ, "PERF": folder, "FLOOR_FSYNC": "1",
                    "PYTHONPATH": SHARED + os.pathsep + ROOT}
        subprocess.run([sys.executable, os.path.join(SHARED, "floor_app.py"), "init", "0"],
                       cwd=SHARED, env=self.env, check=True, capture_output=True)
        self.port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"),
             "-b", f"127.0.0.1:{self.port}", "floor_app:app"], cwd=SHARED, env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(self.port, "/api/series-static")

    def stop(self):
        self.server.terminate()
        self.server.wait(timeout=30)


def bench_single(perf, data, small, rounds):
    """``rounds`` rounds, each on fresh storage: ours, Orthanc and the two floors each get
    the CT, then ``small`` small instances, one client, after a ``sync`` and in an order
    that rotates between rounds; the figures are the medians of the per-round ratios (one
    pass swings by +-25% on a shared 2-core machine, Orthanc too)."""
    ct = files_of(os.path.join(data, "ct200"))
    sm = files_of(os.path.join(data, "small10k"), small)
    megabytes = sum(os.path.getsize(f) for f in ct) / 1e6
    figures = {prefix + kind: [] for prefix in ("", "floor-", "flask-", "peer-")
               for kind in ("ct", "small")}
    for index in range(rounds):
        ours, peer = fresh(perf)
        floor, flask_floor = UploadFloor(perf), FlaskFloor(perf)
        systems = (ours, peer, floor, flask_floor)
        try:
            for system in systems:
                system.single(files_of(os.path.join(data, "extra9k"), 5))
            # Every pass starts with no dirty data waiting for writeback (the fsyncs of a
            # pass would otherwise also wait for the files of the passes before it), and
            # the order of the systems rotates from round to round.
            order = [("floor-", floor), ("flask-", flask_floor), ("peer-", peer), ("", ours)]
            order = order[index % len(order):] + order[:index % len(order)]
            for prefix, system in order:
                os.sync()
                figures[prefix + "ct"].append(megabytes / system.single(ct))
                os.sync()
                figures[prefix + "small"].append(small / system.single(sm))
        finally:
            for system in systems:
                system.stop()
    median = statistics.median
    for kind, unit, goal in (("ct", "MB/s", 1.0), ("small", "inst/s", 0.7)):
        peer = figures["peer-" + kind]
        for label, own, target in ((f"single-{kind}", figures[kind], goal),
                                   (f"  floor-{kind}", figures["floor-" + kind], None),
                                   (f"  flask-{kind}", figures["flask-" + kind], None)):
            ratios = [o / p for o, p in zip(own, peer)]
            line = (f"{label:<14} ours {median(own):9.1f} {unit:<12} orthanc {median(peer):9.1f} "
                    f"{unit:<12} ratio median {median(ratios):5.2f} (rounds: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)})")
            print(line + (f"  (goal >= {target})" if target else ""), flush=True)


def bench_cli(perf, data, small):
    folder = os.path.join(perf, f"folder{small}")
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for name in files_of(os.path.join(data, "small10k"), small):
            shutil.copy(name, folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    zip_path = make_zip(os.path.join(perf, f"small{small}.zip"),
                        files_of(os.path.join(data, "small10k"), small))
    ours = Ours(perf)
    try:
        cli_seconds, line = ours.cli_import(folder)
    finally:
        ours.stop()
    ours = Ours(perf)
    try:
        http_seconds, _message = ours.upload_zip(zip_path)
    finally:
        ours.stop()
    print(f"{'cli-small':<14} import-series {small / cli_seconds:9.1f} inst/s   zip over HTTP "
          f"{small / http_seconds:9.1f} inst/s   ({line})", flush=True)


class Sampler(threading.Thread):
    """Peak RSS of our processes, sampled every 0.1 s."""

    def __init__(self, ours):
        super().__init__(daemon=True)
        self.ours, self.peak, self.stop_event = ours, 0, threading.Event()

    def run(self):
        while not self.stop_event.wait(0.1):
            self.peak = max(self.peak, self.ours.rss_kb())

    def stop(self):
        self.stop_event.set()
        self.join()
        return self.peak


def bench_rss(perf, data, copies):
    ct = make_zip(os.path.join(perf, "ct200.zip"), files_of(os.path.join(data, "ct200")))
    big = make_big_zip(os.path.join(perf, f"big{copies}.zip"),
                       files_of(os.path.join(data, "ct200")), copies)
    small = files_of(os.path.join(data, "small10k")) + files_of(os.path.join(data, "extra9k"))
    first = make_zip(os.path.join(perf, "rss-first1000.zip"), small[:1000])
    rest = make_zip(os.path.join(perf, "rss-rest18000.zip"), small[1000:])
    ours = Ours(perf)
    try:
        ours.single(files_of(os.path.join(data, "extra9k"), 1))
        ours.upload_zip(first)  # warm: every module imported, one task run
        idle = ours.rss_kb()
        for label, path in (("rss-ct-zip", ct), (f"rss-{os.path.getsize(big) // 10**6}MB", big)):
            sampler = Sampler(ours)
            sampler.start()
            seconds, _message = ours.upload_zip(path)
            peak = sampler.stop()
            print(f"{label:<14} idle {idle / 1024:7.1f} MB  peak {peak / 1024:7.1f} MB  "
                  f"ratio {peak / idle:5.2f}  (goal <= 1.2; {seconds:.1f} s)", flush=True)
        after_first = ours.rss_kb()
        sampler = Sampler(ours)
        sampler.start()
        ours.upload_zip(rest)
        peak = sampler.stop()
        after = ours.rss_kb()
        print(f"{'rss-19k':<14} after 1,000 {after_first / 1024:7.1f} MB  after 19,000 "
              f"{after / 1024:7.1f} MB  peak {peak / 1024:7.1f} MB  growth {after / after_first:5.2f}",
              flush=True)
    finally:
        ours.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perf", default="/tmp/perf-ingest", help="scratch directory")
    parser.add_argument("--small", type=int, default=3000, help="small instances per test")
    parser.add_argument("--copies", type=int, default=10, help="CT copies in the big zip")
    parser.add_argument("--only", default="zip,single,cli,rss")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the zip and single figures (medians)")
    parser.add_argument("--trees", default=ROOT,
                        help="comma-separated checkouts whose servers the zip figures measure "
                             "in turn (default: this one)")
    args = parser.parse_args()
    os.makedirs(args.perf, exist_ok=True)
    data = ensure_data(args.perf)
    only = set(args.only.split(","))
    print(f"ingest benchmark, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    if "zip" in only:
        bench_zip(args.perf, data, args.small, args.rounds,
                  [os.path.abspath(t) for t in args.trees.split(",")])
    if "single" in only:
        bench_single(args.perf, data, min(args.small, 1000), args.rounds)
    if "cli" in only:
        bench_cli(args.perf, data, args.small)
    if "rss" in only:
        bench_rss(args.perf, data, args.copies)


if __name__ == "__main__":
    main()
