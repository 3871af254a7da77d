"""Series search benchmark: GET /api/series beside the floor app, same run, same machine.

The floor (``../shared/bench/floor_app.py``) is the fastest a Flask + Flask-SQLAlchemy +
SQLite app answers here. Both apps run on loopback with the same gunicorn settings (sync -w 2,
or gunicorn.conf.py with --served). Both databases get N synthetic series.

Figures:
  list-N        GET /api/series?limit=20 with a token, requests/s from C keep-alive
                connections of wrk (as bench/api_rps.py; ``--load python``: C Python client
                processes, which take much of the 2 cores themselves and swing by +-30%),
                over the floor's token + 20 rows (goal >= 0.8), N = 1,000 and 10,000;
                ours and the floor alternate for R rounds, the median ratio is the figure
  filtered-N    modality + seriesDate range, sorted by seriesDate, with totalItems, over the
                floor's /api/series/search?modality=CT (filter + COUNT) (goal >= 0.7), N = 10,000
  p50           the filtered search from one client: p50 at 100,000 series over p50 at
                1,000 (goal <= 1.2), both served at once and measured alternately

Usage (from the project root)::

    .venv/bin/python bench/search.py                 # ~6 min on 2 cores
    .venv/bin/python bench/search.py --seconds 3 --clients 4 --sizes 1000,10000
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
import time
import urllib.parse

from loadgen import run_clients, wait_up, wrk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "bench")
MODALITIES = "MR CT PT CR US".split()
FILTER = {"$and": [{"modality": "CT"},
                   {"seriesDate": {"$gte": {"$date": "2024-03-01T00:00:00Z"}}},
                   {"seriesDate": {"$lt": {"$date": "2024-09-01T00:00:00Z"}}}]}
FILTERED_PATH = "/api/series?" + urllib.parse.urlencode(
    {"filter": json.dumps(FILTER), "sort": json.dumps({"seriesDate": -1}), "limit": 20})

FILL = """
import sys
from datetime import datetime, timedelta
import sqlalchemy as sa
from app import create_app
from models import Series, db
n = int(sys.argv[1])
app = create_app()
with app.app_context():
    base = datetime(2024, 1, 1)
    rows = []
    for i in range(n):
        rows.append(dict(
            series_uid=f"1.2.826.0.1.{i}", study_uid=f"1.2.826.1.{i // 5}", width=512,
            height=512, images="1-10", series_date=base + timedelta(minutes=i * 527 % 525600),
            modality="MR CT PT CR US".split()[i % 5], series_description=f"Series {i}",
            body_part="", station_name="", model_name="", manufacturer="SYNTH", storage_id=0,
            patient_info={"patientId": f"P{i // 10:04d}", "patientName": f"Synth^P{i // 10:04d}",
                          "age": 20 + i % 60, "sex": "MF"[i % 2]},
            patient_id=f"P{i // 10:04d}", patient_name=f"Synth^P{i // 10:04d}",
            patient_age=20 + i % 60, patient_sex="MF"[i % 2],
            parameters={"KVP": 120, "SliceThickness": 1.0}, domain="default",
            created_at=base + timedelta(seconds=i), updated_at=base + timedelta(seconds=i)))
        if len(rows) == 5000:
            db.session.execute(sa.insert(Series), rows)
            rows = []
    if rows:
        db.session.execute(sa.insert(Series), rows)
    db.session.commit()
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, cmd, cwd, env, port, probe, headers):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.port, self.headers = port, headers
        wait_up(port, probe, headers)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_ours(perf, n):
    data = os.path.join(perf, f"ours-{n}")
    env = {**os.environ, "CIRCUS_DATA_DIR": data}
    flask = [sys.executable, "-m", "flask", "--app", "app"]
    if not os.path.exists(os.path.join(data, "token")):
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        subprocess.run(flask + ["init-db"], cwd=ROOT, env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-c", FILL, str(n)], cwd=ROOT, env=env, check=True)
        out = subprocess.run(flask + ["add-permanent-token", "circus"], cwd=ROOT, env=env,
                             check=True, capture_output=True, text=True).stdout
        with open(os.path.join(data, "token"), "w") as fh:
            fh.write(out.strip().splitlines()[-1])
    with open(os.path.join(data, "token")) as fh:
        token = fh.read().strip()
    # As scripts/serve.sh starts it: init-db upgrades data kept from an older run.
    subprocess.run(flask + ["init-db"], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    return Server([sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, "-w", "2",
                   "-b", f"127.0.0.1:{port}", "app:create_app()"],
                  ROOT, env, port, "/api/series?limit=1", {"Authorization": f"Bearer {token}"})


# Both apps get the same settings: plain sync workers, or with --served the served
# gunicorn.conf.py (ours would otherwise read it from its working directory, the floor not).
GUNICORN_CONFIG = os.devnull


def start_floor(perf, n):
    folder = os.path.join(perf, f"floor-{n}")
    env = {**os.environ, "PERF": folder, "PYTHONPATH": SHARED}
    if not os.path.exists(os.path.join(folder, "floor.db")):
        os.makedirs(folder, exist_ok=True)
        subprocess.run([sys.executable, os.path.join(SHARED, "floor_app.py"), "init", str(n)],
                       cwd=SHARED, env=env, check=True)
    port = free_port()
    return Server([sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, "-w", "2",
                   "-b", f"127.0.0.1:{port}", "floor_app:app"], SHARED, env, port, "/api/series",
                  {"Authorization": "Bearer secret"})


def client(port, path, headers, seconds, queue):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        res = conn.getresponse()
        res.read()
        if res.status != 200:
            raise RuntimeError(f"{path}: {res.status}")
        latencies.append(time.perf_counter() - start)
    queue.put(latencies)


def load(server, path, seconds, clients):
    """(requests/s, p50 ms) of ``path`` from ``clients`` keep-alive client processes."""
    results = run_clients(client, (server.port, path, server.headers, seconds), clients, seconds)
    latencies = [lat for lats in results for lat in lats]
    return len(latencies) / seconds, statistics.median(latencies) * 1000


def throughput(server, path, args):
    """Requests/s of ``path``: from wrk (``--load wrk``, as bench/api_rps.py) or from
    ``args.clients`` Python client processes (``--load python``)."""
    if args.load == "wrk":
        token = server.headers["Authorization"].split(" ", 1)[1]
        return wrk(f"http://127.0.0.1:{server.port}{path}", token, int(args.seconds),
                   args.clients)[0]
    return load(server, path, args.seconds, args.clients)[0]


def rounds_line(label, ours_server, ours_path, floor_server, floor_path, args, goal):
    """Alternate ours and the floor ``args.rounds`` times; print the median ratio (single
    runs of a few seconds swing by +-30% on a shared 2-core machine)."""
    ours, floor = [], []
    for _ in range(args.rounds):
        ours.append(throughput(ours_server, ours_path, args))
        floor.append(throughput(floor_server, floor_path, args))
    ratios = [o / f for o, f in zip(ours, floor)]
    print(f"{label:<14} ours {statistics.median(ours):8.1f} req/s   floor "
          f"{statistics.median(floor):8.1f} req/s   ratio median {statistics.median(ratios):5.2f} "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})  (goal {goal})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perf", default="/tmp/perf-search", help="scratch directory")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4,
                        help="wrk connections, or Python client processes with --load python")
    parser.add_argument("--load", choices=("wrk", "python"), default="wrk",
                        help="load generator of the requests/s figures (the p50 figure always "
                             "comes from one Python client)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per ratio")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--big", type=int, default=100000, help="size for the p50 ratio (0: skip)")
    parser.add_argument("--served", action="store_true",
                        help="both apps with gunicorn.conf.py instead of plain sync workers")
    args = parser.parse_args()
    global GUNICORN_CONFIG
    if args.served:
        GUNICORN_CONFIG = os.path.join(ROOT, "gunicorn.conf.py")
    os.makedirs(args.perf, exist_ok=True)
    if args.load == "wrk" and shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk (or use --load python)")
    print(f"search benchmark, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"requests/s from {args.load} ({args.clients} connections)", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        ours, floor = start_ours(args.perf, n), start_floor(args.perf, n)
        try:
            for server, path in ((ours, "/api/series?limit=20"), (floor, "/api/series")):
                load(server, path, 1, args.clients)  # warm-up
            rounds_line(f"list-{n}", ours, "/api/series?limit=20", floor, "/api/series", args,
                        ">= 0.8")
            if n >= 10000:
                rounds_line(f"filtered-{n}", ours, FILTERED_PATH, floor,
                            "/api/series/search?modality=CT", args, ">= 0.7")
        finally:
            ours.stop()
            floor.stop()
    if args.big:
        p50_ratio(args, min(sizes))


def p50_ratio(args, small):
    """Both sizes served at once; single-client p50s taken alternately, median ratio."""
    servers = {small: start_ours(args.perf, small), args.big: start_ours(args.perf, args.big)}
    try:
        p50 = {n: [] for n in servers}
        for server in servers.values():
            load(server, FILTERED_PATH, 1, 1)  # warm-up
        for _ in range(args.rounds):
            for n, server in servers.items():
                p50[n].append(load(server, FILTERED_PATH, args.seconds, 1)[1])
    finally:
        for server in servers.values():
            server.stop()
    ratios = [b / s for b, s in zip(p50[args.big], p50[small])]
    print(f"{'p50':<14} filtered search p50 {statistics.median(p50[args.big]):.2f} ms at "
          f"{args.big} series, {statistics.median(p50[small]):.2f} ms at {small}: ratio median "
          f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}) "
          "(goal <= 1.2)", flush=True)

if __name__ == "__main__":
    main()
