"""DICOMweb benchmark: our /dicom-web beside Orthanc's DICOMweb plug-in, same data, same run.

Data: ``../shared/bench/gen_dicom.py`` (as bench/ingest.py: 200-slice 512x512 CT, 10,000
small instances in 1,000 series, 9,000 one-instance series), generated once under ``--perf``.
Our server: gunicorn with the served configuration (gunicorn.conf.py) on loopback, as
bench/ingest.py starts it (``Ours``). Orthanc: ``../shared/bench/orthanc.sh`` (its
DICOMweb plug-in under /dicom-web/). Each figure starts both systems on empty storage.

Figures (ratios ours / Orthanc unless said):
  stow-1, stow-50   STOW-RS of N small instances (default 2,000) at 1 and at 50 instances
                    per request, one client: instances/s (goals >= 1.0 and >= 2.0). Each
                    of ``--stow-rounds`` rounds starts every system on empty storage and
                    runs them one after the other, after a ``sync``, in an order that
                    rotates; the figure is the median of the per-round ratios (one pass
                    swings by +-25% on a shared 2-core machine, Orthanc too). Every round
                    stores into folders never used before, removed only after the last
                    round: this file system (ext4 without a journal) skips inodes freed in
                    the last 60-360 s when it allocates one, so creating files right after
                    removing thousands in the same block group (the previous round's
                    storage) costs ~0.5 ms per file instead of ~20 us, and that would be
                    measured instead of the server
  (floor)           beside stow-1, the ceiling of one instance per request here: the same
                    bodies to ``bench/upload_floor.py`` (a bare WSGI app under the same
                    gunicorn settings that only stores the body durably: no Flask, token,
                    parsing or database), and the same files to the shared floor app's
                    naive Flask + SQLAlchemy + SQLite ingest (as bench/ingest.py's floors)
  qido-rps          QIDO-RS ``/series?limit=20&Modality=MR`` on 10,000 series (the small
                    and extra sets, stored by STOW-RS at 50 per request into both): requests/s
                    from wrk's C keep-alive connections, ours and Orthanc alternating for
                    ``--qido-rounds`` rounds; the median of the per-round ratios (goal >= 10)
  qido-p50          ours only: p50 of the same search from one client at 100,000 series
                    over 1,000 series (rows written straight into the database; goal <= 1.2)
  wado-ct           WADO-RS retrieve of the 200-slice CT series (stored syntax): MB/s (>= 1.0)
  metadata-ct       WADO-RS series metadata of the CT: p50 latency (goal <= 0.5), and the
                    first request's (before any cache) beside it
  rss-stow, rss-wado  peak RSS of gunicorn master + workers during a ~1 GB STOW-RS (the CT
                    sent ``--copies`` times, 50 per request) and a ~1 GB retrieve (the CT
                    series retrieved ``--copies`` times), over the idle RSS (goal <= 1.2)

Usage (from the project root)::

    .venv/bin/python bench/dicomweb.py                          # everything
    .venv/bin/python bench/dicomweb.py --stow 100 --series 200 --copies 1 --seconds 2 \\
        --p50-sizes 100,1000                                    # a smoke run
"""
import argparse
import base64
import http.client
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
import uuid

from ingest import (FlaskFloor, Orthanc, Ours, Sampler, UploadFloor, ensure_data, files_of,
                    report)
from loadgen import wait_up

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORTHANC_AUTH = "Basic " + base64.b64encode(b"bench:bench").decode()
QIDO_PATH = "/series?limit=20&Modality=MR"  # under /dicom-web on both
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Rows written straight into the database for qido-p50: series (as bench/search.py) and
# one instance row each (the instance index), in the same shapes the import writes.
FILL = """
import sys
from datetime import datetime, timedelta
import sqlalchemy as sa
from app import create_app
from models import Instance, Series, db
n = int(sys.argv[1])
app = create_app()
with app.app_context():
    base = datetime(2024, 1, 1)
    series, instances = [], []
    for i in range(n):
        uid = f"1.2.826.0.2.{i}"
        series.append(dict(
            series_uid=uid, study_uid=f"1.2.826.2.{i // 5}", width=64, height=64, images="1",
            series_date=base + timedelta(minutes=i * 527 % 525600),
            study_date=(base + timedelta(days=i % 365)).strftime("%Y%m%d"),
            modality="MR CT PT CR US".split()[i % 5], series_description=f"Series {i}",
            study_description="", body_part="", station_name="", model_name="",
            manufacturer="SYNTH", storage_id=0,
            patient_info={"patientId": f"P{i // 10:05d}", "patientName": f"Synth^P{i // 10:05d}"},
            patient_id=f"P{i // 10:05d}", patient_name=f"Synth^P{i // 10:05d}",
            parameters={}, domain="default", created_at=base + timedelta(seconds=i),
            updated_at=base + timedelta(seconds=i)))
        instances.append(dict(series_uid=uid, instance_number=1,
                              sop_instance_uid=f"1.2.826.3.{i}",
                              sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                              transfer_syntax_uid="1.2.840.10008.1.2.1", number_of_frames=None,
                              rows=64, columns=64))
        if len(series) == 5000:
            db.session.execute(sa.insert(Series), series)
            db.session.execute(sa.insert(Instance), instances)
            series, instances = [], []
    if series:
        db.session.execute(sa.insert(Series), series)
        db.session.execute(sa.insert(Instance), instances)
    db.session.commit()
"""


# --- clients ------------------------------------------------------------------------------

class Client:
    """One keep-alive connection to a DICOMweb server (ours: bearer token, Orthanc: basic)."""

    def __init__(self, port, auth, prefix="/dicom-web", ok=200):
        self.port, self.auth, self.prefix, self.ok = port, auth, prefix, ok
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def request(self, method, path, body=None, headers=None, sink=None):
        if self.conn.sock is not None and self._idle():
            # The server closed a connection idle beyond its keep-alive (gunicorn: 5 s):
            # a request on it would fail; the next one opens a new connection.
            self.conn.close()
        self.conn.request(method, self.prefix + path, body=body,
                          headers={"Authorization": self.auth, **(headers or {})})
        res = self.conn.getresponse()
        if sink is None:
            return res.status, res.read()
        size = 0
        while chunk := res.read(1024 * 1024):
            size += len(chunk)
        return res.status, size

    def _idle(self):
        """Whether the server has closed the connection (readable at EOF)."""
        readable, _, _ = select.select([self.conn.sock], [], [], 0)
        return bool(readable)

    def stow(self, paths):
        """STOW-RS of ``paths`` in one request (the body streamed from the files)."""
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        size = sum(len(head) + os.path.getsize(p) + 2 for p in paths) + len(boundary) + 6

        def body():
            for path in paths:
                yield head
                with open(path, "rb") as fh:
                    yield fh.read()
                yield b"\r\n"
            yield f"--{boundary}--\r\n".encode()
        status, data = self.request("POST", "/studies", body=body(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(size), "Accept": "application/dicom+json"})
        if status != self.ok:
            raise RuntimeError(f"STOW-RS on port {self.port}: {status} {data[:300]!r}")


def ours_client(ours):
    return Client(ours.port, f"Bearer {ours.token}")


def orthanc_client():
    return Client(Orthanc.port, ORTHANC_AUTH)


def stow_all(client, paths, per_request):
    start = time.perf_counter()
    for i in range(0, len(paths), per_request):
        client.stow(paths[i:i + per_request])
    return time.perf_counter() - start


def ct_uids(data):
    import pydicom
    first = pydicom.dcmread(files_of(os.path.join(data, "ct200"))[0], stop_before_pixels=True)
    return str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def wrk(port, path, auth, seconds, connections):
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-H", f"Authorization: {auth}", f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        sys.exit(f"wrk saw non-2xx answers from {path}:\n{out}")
    return float(out.split("Requests/sec:")[1].split()[0])


def p50_ms(client, path, rounds, headers=None):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        status, _data = client.request("GET", path, headers=headers)
        times.append((time.perf_counter() - start) * 1000)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
    return statistics.median(times)


class OurServer(Ours):
    """``Ours`` whose gunicorn can be stopped and started again on the same data (qido-p50
    writes its rows in between); the worker process is not needed here."""

    def stop_server(self):
        self.server.terminate()
        self.server.wait(timeout=30)

    def start_server(self):
        self.server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}", "app:create_app()"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_up(self.port, "/api/status")


# --- figures ------------------------------------------------------------------------------

def median_ratios(label, own, peer, unit, goal=None, who="ours"):
    """One line: the medians of ``own`` (``who``'s) and ``peer`` and of their per-round
    ratios."""
    ratios = [o / p for o, p in zip(own, peer)]
    median = statistics.median
    line = (f"{label:<14} {who:<5}{median(own):9.1f} {unit:<12} orthanc {median(peer):9.1f} "
            f"{unit:<12} ratio median {median(ratios):5.2f} (rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(line + (f"  (goal >= {goal})" if goal else ""), flush=True)


class FloorStow:
    """bench/upload_floor.py as a STOW-RS peer: the same multipart bodies, stored durably
    as they come (it answers 201)."""

    def __init__(self, perf):
        self.server = UploadFloor(perf)

    def client(self):
        return Client(self.server.port, "Bearer unused", ok=201)

    def stop(self):
        self.server.stop()


STOW_SYSTEMS = (("ours", OurServer), ("peer", Orthanc), ("floor", FloorStow),
                ("flask", FlaskFloor))  # the floors at one instance per request only


def stow_round(folder, index, per_request, small, warm):
    """One round of STOW-RS on new storage under ``folder``: {system: instances/s}."""
    systems, speeds = {}, {}
    try:  # each started one is stopped, whichever fails to start
        for name, start in STOW_SYSTEMS[:4 if per_request == 1 else 2]:
            systems[name] = start(folder)
        clients = {"ours": ours_client(systems["ours"]), "peer": orthanc_client()}
        if per_request == 1:
            clients["floor"] = systems["floor"].client()
            systems["flask"].single(warm)
        for client in clients.values():  # every module imported, every worker answered
            stow_all(client, warm, 1)
        order = list(systems)
        for name in order[index % len(order):] + order[:index % len(order)]:
            os.sync()  # no writeback of the passes before to wait for
            seconds = (systems[name].single(small) if name == "flask" else
                       stow_all(clients[name], small, per_request))
            speeds[name] = len(small) / seconds
    finally:
        for system in systems.values():
            system.stop()
    return speeds


def bench_stow(perf, data, count, rounds):
    small = files_of(os.path.join(data, "small10k"), count)
    warm = files_of(os.path.join(data, "extra9k"), 5)
    folders = []
    try:
        for per_request, goal in ((1, 1.0), (50, 2.0)):
            figures = {name: [] for name, _start in STOW_SYSTEMS}
            for index in range(rounds):
                folders.append(os.path.join(perf, f"stow-{uuid.uuid4().hex[:8]}"))  # new: above
                for name, speed in stow_round(folders[-1], index, per_request, small,
                                              warm).items():
                    figures[name].append(speed)
            median_ratios(f"stow-{per_request}", figures["ours"], figures["peer"], "inst/s", goal)
            if per_request == 1:
                median_ratios("  floor-1", figures["floor"], figures["peer"], "inst/s", who="floor")
                median_ratios("  flask-1", figures["flask"], figures["peer"], "inst/s", who="flask")
    finally:  # removed last, whatever happened (see the module docstring)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def bench_qido(perf, data, series, seconds, connections, rounds):
    paths = files_of(os.path.join(data, "small10k")) + files_of(os.path.join(data, "extra9k"))
    # 10 instances per series in small10k, then one per series: the first ``series`` series.
    paths = paths[:10 * series] if series <= 1000 else paths[:10000 + series - 1000]
    ours, peer = OurServer(perf), Orthanc(perf)
    try:
        stow_all(ours_client(ours), paths, 50)
        stow_all(orthanc_client(), paths, 50)
        ours_rps, peer_rps = [], []
        for _ in range(rounds):
            ours_rps.append(wrk(ours.port, "/dicom-web" + QIDO_PATH, f"Bearer {ours.token}",
                                seconds, connections))
            peer_rps.append(wrk(Orthanc.port, "/dicom-web" + QIDO_PATH, ORTHANC_AUTH, seconds,
                                connections))
    finally:
        ours.stop()
        peer.stop()
    median_ratios(f"qido-rps-{series}", ours_rps, peer_rps, "req/s", 10.0)


def bench_p50(perf, sizes, rounds):
    medians = {}
    for n in sizes:
        ours = OurServer(perf)
        try:
            ours.stop_server()
            subprocess.run([sys.executable, "-c", FILL, str(n)], cwd=ROOT, env=ours.env,
                           check=True)
            ours.start_server()
            client = ours_client(ours)
            p50_ms(client, QIDO_PATH, 20)  # warm
            medians[n] = p50_ms(client, QIDO_PATH, rounds)
        finally:
            ours.stop()
    small, large = medians[sizes[0]], medians[sizes[-1]]
    print(f"{'qido-p50':<14} {sizes[0]:,} series {small:7.2f} ms  {sizes[-1]:,} series "
          f"{large:7.2f} ms  ratio {large / small:5.2f}  (goal <= 1.2)", flush=True)


def bench_wado(perf, data, rounds):
    ct = files_of(os.path.join(data, "ct200"))
    study, series = ct_uids(data)
    megabytes = sum(os.path.getsize(f) for f in ct) / 1e6
    path = f"/studies/{study}/series/{series}"
    ours, peer = OurServer(perf), Orthanc(perf)
    try:
        clients = {"ours": ours_client(ours), "peer": orthanc_client()}
        for client in clients.values():
            stow_all(client, ct, 50)
        speed, latency, first = {}, {}, {}
        for name, client in clients.items():
            client.request("GET", path, headers={"Accept": RETRIEVE_ACCEPT}, sink=True)  # warm
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                status, size = client.request("GET", path, headers={"Accept": RETRIEVE_ACCEPT},
                                              sink=True)
                times.append(time.perf_counter() - start)
                if status != 200 or size < megabytes * 1e6:
                    raise RuntimeError(f"{name} retrieve: {status}, {size} bytes")
            speed[name] = megabytes / statistics.median(times)
            # The first request reads every file; later ones may be served from a cache
            # (ours keeps encoded metadata per file): both are shown.
            first[name] = p50_ms(client, path + "/metadata", 1,
                                 {"Accept": "application/dicom+json"})
            latency[name] = p50_ms(client, path + "/metadata", rounds * 3,
                                   {"Accept": "application/dicom+json"})
    finally:
        ours.stop()
        peer.stop()
    report("wado-ct", speed["ours"], speed["peer"], "MB/s", 1.0)
    ratio = latency["ours"] / latency["peer"]
    print(f"{'metadata-ct':<14} ours {latency['ours']:9.1f} ms p50      orthanc "
          f"{latency['peer']:9.1f} ms p50      ratio {ratio:5.2f}  (goal <= 0.5; first "
          f"request: ours {first['ours']:.1f} ms, orthanc {first['peer']:.1f} ms)", flush=True)


def bench_rss(perf, data, copies):
    ct = files_of(os.path.join(data, "ct200"))
    study, series = ct_uids(data)
    megabytes = sum(os.path.getsize(f) for f in ct) * copies / 1e6
    ours = OurServer(perf)
    try:
        client = ours_client(ours)
        stow_all(client, ct[:50], 50)  # warm: every module imported
        client.request("GET", f"/studies/{study}/series/{series}",
                       headers={"Accept": RETRIEVE_ACCEPT}, sink=True)
        idle = ours.rss_kb()
        sampler = Sampler(ours)
        sampler.start()
        for _ in range(copies):
            stow_all(client, ct, 50)
        peak = sampler.stop()
        print(f"{'rss-stow':<14} {megabytes:6.0f} MB  idle {idle / 1024:7.1f} MB  peak "
              f"{peak / 1024:7.1f} MB  ratio {peak / idle:5.2f}  (goal <= 1.2)", flush=True)
        sampler = Sampler(ours)
        sampler.start()
        for _ in range(copies):
            client.request("GET", f"/studies/{study}/series/{series}",
                           headers={"Accept": RETRIEVE_ACCEPT}, sink=True)
        peak = sampler.stop()
        print(f"{'rss-wado':<14} {megabytes:6.0f} MB  idle {idle / 1024:7.1f} MB  peak "
              f"{peak / 1024:7.1f} MB  ratio {peak / idle:5.2f}  (goal <= 1.2)", flush=True)
    finally:
        ours.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perf", default="/tmp/perf-dicomweb", help="scratch directory")
    parser.add_argument("--stow", type=int, default=2000, help="instances of stow-1/stow-50")
    parser.add_argument("--stow-rounds", type=int, default=3, help="rounds of stow-1/stow-50")
    parser.add_argument("--series", type=int, default=10000, help="series of qido-rps")
    parser.add_argument("--p50-sizes", default="1000,100000", help="series of qido-p50")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration")
    parser.add_argument("--qido-rounds", type=int, default=3, help="wrk runs of each system")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timed GETs")
    parser.add_argument("--copies", type=int, default=10, help="CT copies of the rss figures")
    parser.add_argument("--only", default="stow,qido,p50,wado,rss")
    args = parser.parse_args()
    os.makedirs(args.perf, exist_ok=True)
    data = ensure_data(args.perf)
    only = set(args.only.split(","))
    print(f"dicomweb benchmark, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
          flush=True)
    if "stow" in only:
        bench_stow(args.perf, data, args.stow, args.stow_rounds)
    if "qido" in only:
        bench_qido(args.perf, data, args.series, args.seconds, args.connections,
                   args.qido_rounds)
    if "p50" in only:
        bench_p50(args.perf, [int(n) for n in args.p50_sizes.split(",")], args.rounds * 20)
    if "wado" in only:
        bench_wado(args.perf, data, args.rounds)
    if "rss" in only:
        bench_rss(args.perf, data, args.copies)


if __name__ == "__main__":
    main()
