"""DICOM networking benchmark: our listener (`flask --app app dicom-listener`) beside Orthanc's
DICOM port, same data, same run, DCMTK as the client (``TCP_NODELAY=1`` on both sides).

Data: ``../shared/bench/gen_dicom.py`` (200-slice CT, 10,000 small instances in 1,000 series,
9,000 one-instance series), generated once under ``--perf``. Orthanc:
``../shared/bench/orthanc.sh`` (AET ORTHANC, port 4242). Ours: a fresh data directory, the
node STORESCU (any host; echo, store, find, get) registered, the listener on a free port.

Figures (ratios ours / Orthanc):
  store-small   `storescu`, one association, --small small instances: instances/s (goal >= 1.5)
  store-ct      `storescu`, one association, the 200-slice CT: MB/s           (goal >= 1.0)
                Both are medians of ``--rounds`` rounds; each round starts ours and Orthanc on
                storage never used before (see bench/ingest.py ``new_folder``) and sends to
                every system in an order that rotates, after a ``sync``
  ceiling       beside store-small and store-ct: the same storescu runs into
                bench/dicom_ceiling.py, a bare pynetdicom SCP built as our listener (same
                contexts, transfer syntaxes, maximum PDU, TCP_NODELAY, DUL poll delay,
                prompt reactor, no standard log handlers) whose C-STORE handler returns
                Success untouched (``null``) or only writes the bytes to /dev/null
                (``devnull``); printed with ours / ceiling and ceiling / Orthanc. The goals
                are out of reach when ceiling / Orthanc is below them: pynetdicom's DUL
                thread polls its socket every DUL_POLL_SECONDS and decodes every PDU in
                Python (its association reactor's fixed 1 ms sleep per loop is replaced
                by dicom.net.prompt_reactor).
  store-4       4 `storescu` at once on disjoint quarters: total instances/s, beside store-small
  rss           ours only: listener RSS after all 19,000 small instances over its RSS after
                the first 1,000 (goal <= 1.2)
  find-series   `findscu` at SERIES level, Modality=MR, over the 10,000 series: responses/s
  get-ct        `getscu` of the CT series: MB/s

Usage (from the project root)::

    .venv/bin/python bench/dicom_net.py                    # everything (~10 min on 2 cores)
    .venv/bin/python bench/dicom_net.py --small 200 --total 1500 --no-orthanc   # a smoke run
    .venv/bin/python bench/dicom_net.py --small 200 --only store --no-orthanc   # ceiling too
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ingest import (ORTHANC_AUTH, ROOT, Orthanc, ensure_data, files_of, free_port, new_folder,
                    rss_kb)

STORESCU = "STORESCU"
CLIENT_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(name):
    """DCMTK's tool (/usr/bin), not pynetdicom's same-named script in the venv."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    sys.exit(f"DCMTK's {name} is missing: apt-get install -y dcmtk")


class Ours:
    """The listener process on a fresh data directory."""
    aet = "CIRCUS"
    host = "127.0.0.1"

    def __init__(self, perf):
        self.dir = new_folder(perf, "circus-net")  # never used before: see bench/ingest.py
        self.env = {**os.environ, "CIRCUS_DATA_DIR": self.dir}
        flask = [sys.executable, "-m", "flask", "--app", "app"]
        subprocess.run(flask + ["init-db"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        subprocess.run(flask + ["dicom-node-add", STORESCU, "--domain", "default", "--allow",
                                "echo,store,find,get"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        self.port = free_port()
        self.proc = subprocess.Popen(flask + ["dicom-listener", "--port", str(self.port)],
                                     cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_echo(self)

    def rss_kb(self):
        return rss_kb(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Ceiling:
    """bench/dicom_ceiling.py: a bare pynetdicom SCP built as the listener, ``mode`` null or
    devnull."""
    aet = "CIRCUS"
    host = "127.0.0.1"

    def __init__(self, mode):
        self.mode = mode
        self.port = free_port()
        script = os.path.join(ROOT, "bench", "dicom_ceiling.py")
        self.proc = subprocess.Popen([sys.executable, script, self.aet, str(self.port), mode],
                                     cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_echo(self)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Peer(Orthanc):
    aet = "ORTHANC"
    host = "127.0.0.1"
    port = 4242

    def __init__(self, perf):
        super().__init__(perf)
        allow_client()


def allow_client():
    """Register our client AE as an Orthanc modality allowed every service: Orthanc refuses
    C-FIND and C-GET from an AE its ``DicomModalities`` does not list (the shared config
    lists none). Its REST API adds it for this run only."""
    body = json.dumps({"AET": STORESCU, "Host": "127.0.0.1", "Port": 104, "AllowEcho": True,
                       "AllowFind": True, "AllowGet": True, "AllowMove": True,
                       "AllowStore": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", Orthanc.port, timeout=60)
    conn.request("PUT", f"/modalities/{STORESCU}", body=body,
                 headers={"Authorization": ORTHANC_AUTH, "Content-Type": "application/json"})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    if res.status != 200:
        raise RuntimeError(f"Orthanc refused the modality {STORESCU}: {res.status} {data[:200]}")


def wait_echo(target, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([dcmtk("echoscu"), "-aet", STORESCU, "-aec", target.aet,
                               target.host, str(target.port)], capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{target.aet} does not answer C-ECHO")


def store(target, files):
    """One storescu association sending ``files``; seconds."""
    # storescu takes files on the command line: a folder it scans keeps argv short.
    folder = tempfile.mkdtemp()
    for n, name in enumerate(files):
        os.symlink(name, os.path.join(folder, f"{n:06d}.dcm"))
    start = time.perf_counter()
    try:
        done = subprocess.run([dcmtk("storescu"), "-aet", STORESCU, "-aec", target.aet,
                               "+sd", "+r", target.host, str(target.port), folder],
                              env=CLIENT_ENV, capture_output=True, text=True)
    finally:
        elapsed = time.perf_counter() - start
        shutil.rmtree(folder)
    if done.returncode != 0:
        raise RuntimeError(f"storescu into {target.aet}: {done.stderr[-500:]}")
    return elapsed


def store_parallel(target, files, associations):
    """``associations`` storescu processes at once on disjoint parts; seconds."""
    parts = [files[i::associations] for i in range(associations)]
    folders = []
    for part in parts:
        folder = tempfile.mkdtemp()
        for n, name in enumerate(part):
            os.symlink(name, os.path.join(folder, f"{n:06d}.dcm"))
        folders.append(folder)
    start = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", STORESCU, "-aec", target.aet, "+sd",
                               "+r", target.host, str(target.port), folder], env=CLIENT_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for folder in folders]
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - start
    for folder in folders:
        shutil.rmtree(folder)
    if any(codes):
        raise RuntimeError(f"storescu into {target.aet}: exit codes {codes}")
    return elapsed


def check(done, tool, target):
    """A DCMTK client's failure as an error with its output."""
    if done.returncode != 0:
        raise RuntimeError(f"{tool} against {target.aet} (exit {done.returncode}): "
                           f"{done.stderr[-800:]}")


def find_series(target, rounds):
    """(responses/s, matches) of `findscu` SERIES-level Modality=MR queries."""
    matches = 0
    start = time.perf_counter()
    for _ in range(rounds):
        out = tempfile.mkdtemp()
        done = subprocess.run([dcmtk("findscu"), "-S", "-aet", STORESCU, "-aec", target.aet,
                               "-X", "-od", out, "-k", "QueryRetrieveLevel=SERIES", "-k",
                               "Modality=MR", "-k", "SeriesInstanceUID", "-k",
                               "StudyInstanceUID", target.host, str(target.port)],
                              env=CLIENT_ENV, capture_output=True, text=True)
        check(done, "findscu", target)
        matches = len(os.listdir(out))
        shutil.rmtree(out)
    elapsed = time.perf_counter() - start
    return matches * rounds / elapsed, matches


def get_series(target, series_uid, size):
    """MB/s of `getscu` retrieving one series."""
    out = tempfile.mkdtemp()
    start = time.perf_counter()
    done = subprocess.run([dcmtk("getscu"), "-S", "-aet", STORESCU, "-aec", target.aet, "-od",
                           out, "-k", "QueryRetrieveLevel=SERIES", "-k",
                           f"SeriesInstanceUID={series_uid}", target.host, str(target.port)],
                          env=CLIENT_ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    check(done, "getscu", target)
    received = len(os.listdir(out))
    shutil.rmtree(out)
    return size / 1e6 / elapsed, received


def report(label, ours, peer, unit, goal=None):
    line = f"{label:<12} ours {ours:9.1f} {unit:<12}"
    if peer:
        line += f" orthanc {peer:9.1f} {unit:<12} ratio {ours / peer:5.2f}"
    if goal:
        line += f"  (goal {goal})"
    print(line, flush=True)


def report_ceiling(ceilings, ours, peer, unit):
    """Each ceiling beside ours and Orthanc's: ours / ceiling, ceiling / Orthanc."""
    for ceiling, rate in ceilings:
        line = f"{'':12} ceiling {ceiling.mode:<7} {rate:9.1f} {unit:<6} ours/ceiling " \
               f"{ours / rate:5.2f}"
        if peer:
            line += f"  ceiling/orthanc {rate / peer:5.2f}"
        print(line, flush=True)


def both(perf, with_orthanc):
    ours = Ours(perf)
    peer = None
    if with_orthanc:
        peer = Peer(perf)
        wait_echo(peer)
    return ours, peer


def stop(*targets):
    for target in targets:
        if target is not None:
            target.stop()


def store_round(perf, index, small, ct, with_orthanc, ceilings):
    """One round of store-small and store-ct on new storage, the systems in an order that
    rotates with ``index``: {(figure, system): rate}."""
    ct_mb = sum(os.path.getsize(f) for f in ct) / 1e6
    ours, peer = both(perf, with_orthanc)
    try:
        systems = [("ours", ours)] + ([("peer", peer)] if peer else []) + \
            [(f"ceiling {c.mode}", c) for c in ceilings]
        systems = systems[index % len(systems):] + systems[:index % len(systems)]
        rates = {}
        for figure, files, amount in (("store-small", small, len(small)), ("store-ct", ct, ct_mb)):
            for name, target in systems:
                os.sync()  # no writeback of the passes before to wait for
                rates[figure, name] = amount / store(target, files)
        return rates
    finally:
        stop(ours, peer)


def bench_store(perf, small, ct, count, rounds, with_orthanc, with_store, with_parallel):
    """store-small, store-ct (medians of ``rounds``, each on new storage) and store-4."""
    batch = small[:count]
    ceilings = [Ceiling(mode) for mode in ("null", "devnull")] if with_store else []
    try:
        if with_store:
            results = [store_round(perf, index, batch, ct, with_orthanc, ceilings)
                       for index in range(rounds)]
            for figure, unit, goal in (("store-small", "inst/s", ">= 1.5"),
                                       ("store-ct", "MB/s", ">= 1.0")):
                ours = [r[figure, "ours"] for r in results]
                peer = [r[figure, "peer"] for r in results] if with_orthanc else []
                ratios = [o / p for o, p in zip(ours, peer)]
                report(figure, statistics.median(ours), statistics.median(peer) if peer else 0,
                       unit, goal)
                if ratios:
                    print(f"{'':12} ratio per round: {', '.join(f'{r:.2f}' for r in ratios)}, "
                          f"median {statistics.median(ratios):.2f}", flush=True)
                report_ceiling([(c, statistics.median(r[figure, f"ceiling {c.mode}"]
                                                      for r in results)) for c in ceilings],
                               statistics.median(ours), statistics.median(peer) if peer else 0,
                               unit)
    finally:
        stop(*ceilings)
    if with_parallel:
        ours, peer = both(perf, with_orthanc)
        try:
            mine = len(batch) / store(ours, batch)
            batch = small[count:2 * count] or batch
            four = len(batch) / store_parallel(ours, batch, 4)
            four_peer = len(batch) / store_parallel(peer, batch, 4) if peer else 0
            report("store-4", four, four_peer, "inst/s")
            print(f"{'':12} ours: 4 associations {four:.1f} vs one {mine:.1f} inst/s "
                  f"({four / mine:.2f}x)", flush=True)
        finally:
            stop(ours, peer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perf", default="/tmp/perf-dicom-net", help="scratch directory")
    parser.add_argument("--small", type=int, default=2000, help="small instances per store test")
    parser.add_argument("--only", default="store,parallel,rss,find,get")
    parser.add_argument("--find-rounds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3,
                        help="store rounds, each on new storage; figures are their medians")
    parser.add_argument("--total", type=int, default=None,
                        help="small instances stored for rss/find/get (default: all 19,000)")
    parser.add_argument("--no-orthanc", action="store_true", help="ours and the ceiling only (smoke runs)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.perf, exist_ok=True)
    data = ensure_data(args.perf)
    small = files_of(os.path.join(data, "small10k"))
    extra = files_of(os.path.join(data, "extra9k"))
    ct = files_of(os.path.join(data, "ct200"))
    ct_bytes = sum(os.path.getsize(f) for f in ct)
    with_orthanc = not args.no_orthanc

    if "store" in only or "parallel" in only:
        bench_store(args.perf, small, ct, args.small, args.rounds, with_orthanc,
                    "store" in only, "parallel" in only)

    if only & {"rss", "find", "get"}:
        ours, peer = both(args.perf, with_orthanc and bool(only & {"find", "get"}))
        try:
            everything = (small + extra)[:args.total]
            store(ours, everything[:1000])
            first = ours.rss_kb()
            store(ours, everything[1000:])
            last = ours.rss_kb()
            if "rss" in only:
                print(f"rss          ours {last / 1024:.0f} MB after {len(everything)} instances "
                      f"/ {first / 1024:.0f} MB after 1,000 = {last / first:.2f} (goal <= 1.2)",
                      flush=True)
            store(ours, ct)
            if peer:
                store(peer, everything)
                store(peer, ct)
            time.sleep(1)  # our index: within a second
            if "find" in only:
                rate, matches = find_series(ours, args.find_rounds)
                peer_rate, peer_matches = find_series(peer, args.find_rounds) if peer else (0, 0)
                report("find-series", rate, peer_rate, "responses/s")
                print(f"{'':12} matches: ours {matches}, orthanc {peer_matches}", flush=True)
            if "get" in only:
                import pydicom
                uid = pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID
                rate, received = get_series(ours, uid, ct_bytes)
                peer_rate, peer_received = get_series(peer, uid, ct_bytes) if peer else (0, 0)
                report("get-ct", rate, peer_rate, "MB/s")
                print(f"{'':12} instances: ours {received}, orthanc {peer_received}", flush=True)
        finally:
            stop(ours, peer)


if __name__ == "__main__":
    main()
