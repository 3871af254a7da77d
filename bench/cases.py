"""Benchmark of case search and concurrent revision appends (issue 4).

Figures, each measured in the same run against the floor app of ../shared/bench:

* ``GET /api/cases`` with a filter on a tag and a createdAt range, sorted by createdAt,
  page of 20 with totalItems, as a user who can read (and see patient info of) 10 of 20
  projects, at each database size: requests/s (keep-alive clients) as a ratio to the floor's
  token + 20 rows endpoint (goal >= 0.6), and the single-client p50 latency at the largest
  size as a ratio to the smallest (goal <= 1.2).
* Revisions appended per second by 8 concurrent clients on one case, with the revision
  count before and after (none may be lost).

Cases are generated through the models (ORM bulk inserts), not the HTTP API. They are
created at a constant rate (one every 10 minutes, as a busy site would), so the database
grows with time while "the last 7 days" stays a window of about 1,000 cases: the figure
measures how the endpoint scales with the size of the database, not with the result size.

Usage (from the project root)::

    .venv/bin/python bench/cases.py                 # SQLite, 1,000 and 100,000 cases
    .venv/bin/python bench/cases.py --pg            # also PostgreSQL (throwaway server)
    .venv/bin/python bench/cases.py --pg --pg-random-page-cost 1.1   # SSD planner costs
    .venv/bin/python bench/cases.py --sizes 1000 --seconds 3

Both servers run as ``gunicorn -w 2`` on loopback; the load generator is this script
(processes with one keep-alive connection each), shared by both servers.
"""
import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime, timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BENCH = os.path.join(os.path.dirname(ROOT), "shared", "bench")
PG_TOOL = os.path.join(os.path.dirname(ROOT), "shared", "tools", "pg-throwaway.sh")
sys.path.insert(0, ROOT)

PROJECTS = 20
READABLE = 10
SERIES = 200
TAGS = [f"tag{i}" for i in range(10)]
STEP = timedelta(minutes=10)
END = datetime(2024, 6, 1)
WINDOW = timedelta(days=7)
BATCH = 5000
FLOOR_TOKEN = "secret"


# --- servers ----------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port, path, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


GUNICORN_CONFIG = os.devnull  # same settings for both apps: plain sync workers (see --served)


def gunicorn(app_spec, cwd, env, port, log):
    # An explicit -c for both apps: otherwise ours would read ./gunicorn.conf.py and the
    # floor (started in ../shared/bench) would not, and the two would not be comparable.
    cmd = [os.path.join(ROOT, ".venv", "bin", "gunicorn"), "-c", GUNICORN_CONFIG, "-w", "2",
           "-b", f"127.0.0.1:{port}", app_spec]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=log,
                            start_new_session=True)


def stop(process):
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    process.wait(timeout=30)


# --- load generation --------------------------------------------------------------------

def _client(args):
    port, method, path, headers, body, deadline, count_limit = args
    conn = http.client.HTTPConnection("127.0.0.1", port)
    latencies, statuses = [], {}
    while time.time() < deadline and len(latencies) < count_limit:
        start = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - start)
        statuses[response.status] = statuses.get(response.status, 0) + 1
    conn.close()
    return latencies, statuses


def load(port, path, headers, seconds, clients, count_limit=10**9):
    """Run ``clients`` keep-alive clients for ``seconds``; return (req/s, p50 ms, statuses)."""
    deadline = time.time() + seconds
    jobs = [(port, "GET", path, headers, None, deadline, count_limit)] * clients
    started = time.perf_counter()
    if clients == 1:
        results = [_client(jobs[0])]
    else:
        with multiprocessing.Pool(clients) as pool:
            results = pool.map(_client, jobs)
    elapsed = time.perf_counter() - started
    latencies = [x for lat, _ in results for x in lat]
    statuses = {}
    for _, st in results:
        for code, n in st.items():
            statuses[code] = statuses.get(code, 0) + n
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, statuses


# --- data -------------------------------------------------------------------------------

def make_app(data_dir, database_url):
    from app import create_app
    return create_app({"CIRCUS_DATA_DIR": data_dir, "DATABASE_URL": database_url})


def generate(data_dir, database_url, n_cases):
    """Create the schema, 20 projects, the bench user and ``n_cases`` cases; return the
    user's token, the first readable case and the filter."""
    import sqlalchemy as sa

    import db_maintenance
    from auth import issue_permanent_token
    from cli import create_initial_data
    from models import (CaseRevision, CaseSeries, CaseTag, ClinicalCase, Group, Project,
                        Series, User, db, iso, new_ulid)

    app = make_app(data_dir, database_url)
    with app.app_context():
        if database_url:
            db.drop_all()
            with db.engine.begin() as conn:
                conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        db_maintenance.prepare()
        create_initial_data()
        projects = [Project(project_id=new_ulid(), project_name=f"p{i}", description="",
                            icon={"glyph": "calc", "color": "#ffffff",
                                  "backgroundColor": "#000000"}) for i in range(PROJECTS)]
        db.session.add_all(projects)
        pids = [p.project_id for p in projects]
        readable = pids[:READABLE]
        group = Group(group_name="bench readers", privileges=["personalInfoView"],
                      domains=["default"], read_projects=readable, write_projects=readable,
                      view_personal_info_projects=readable)
        db.session.add(group)
        db.session.flush()
        db.session.add(User(user_email="bench@example.com", login_id="bench", password="x",
                            groups=[group.group_id], preferences={"personalInfoView": True}))
        db.session.flush()
        for i in range(SERIES):
            series = Series(series_uid=f"1.2.840.99.{i}", study_uid=f"1.2.840.98.{i}",
                            width=512, height=512, images="1-100", modality="CT",
                            domain="default", parameters={})
            series.set_patient_info({"patientId": f"P{i:04d}", "patientName": f"Name{i}",
                                     "age": 20 + i % 60, "sex": "FM"[i % 2]})
            db.session.add(series)
        _token_id, token = issue_permanent_token("bench@example.com", "bench")
        db.session.commit()

        first_readable = None
        for offset in range(0, n_cases, BATCH):
            cases, revisions, tags, links = [], [], [], []
            for i in range(offset, min(n_cases, offset + BATCH)):
                case_id = new_ulid()
                created = END - (n_cases - i) * STEP
                uid = f"1.2.840.99.{i % SERIES}"
                revision = {"creator": "bench@example.com", "date": iso(created),
                            "description": "Created new case.", "attributes": {},
                            "status": "draft",
                            "series": [{"seriesUid": uid, "partialVolumeDescriptor":
                                        {"start": 1, "end": 100, "delta": 1}, "labels": []}]}
                case_tags = list(dict.fromkeys([TAGS[i % 10], TAGS[(7 * i + 3) % 10]]))
                project = pids[i % PROJECTS]
                if first_readable is None and project in readable:
                    first_readable = case_id
                cases.append({"case_id": case_id, "project_id": project, "tags": case_tags,
                              "latest_revision": revision, "revision_count": 1,
                              "domains": ["default"], "first_series_uid": uid,
                              "created_at": created, "updated_at": created})
                revisions.append({"case_id": case_id, "revision_index": 0, "data": revision})
                tags.extend({"case_id": case_id, "tag": t} for t in case_tags)
                links.append({"case_id": case_id, "series_uid": uid})
            db.session.execute(sa.insert(ClinicalCase), cases)
            db.session.execute(sa.insert(CaseRevision), revisions)
            db.session.execute(sa.insert(CaseTag), tags)
            db.session.execute(sa.insert(CaseSeries), links)
            db.session.commit()
        if db.engine.dialect.name == "sqlite":
            with db.engine.begin() as conn:
                conn.execute(sa.text("ANALYZE"))
        else:
            # As autovacuum would have done on a live database: statistics and visibility map.
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("VACUUM ANALYZE"))
        db.session.remove()
        db.engine.dispose()
    return token, first_readable


def size_database(database_url, size):
    """A database of its own for each size on the PostgreSQL server (None: SQLite)."""
    if not database_url:
        return None
    import sqlalchemy as sa
    address, _, query = database_url.partition("?")
    base, _, _name = address.rpartition("/")
    name = f"bench_{size}"
    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{base}/{name}" + (f"?{query}" if query else "")


def case_filter():
    since = (END - WINDOW).strftime("%Y-%m-%dT%H:%M:%SZ")
    until = END.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"$and": [{"tags": "tag3"}, {"createdAt": {"$gte": {"$date": since}}},
                     {"createdAt": {"$lt": {"$date": until}}}]}


def search_path():
    query = urllib.parse.urlencode({"filter": json.dumps(case_filter()),
                                    "sort": json.dumps({"createdAt": -1}),
                                    "limit": 20, "page": 1})
    return "/api/cases?" + query


def revision_count(data_dir, database_url, case_id):
    import sqlalchemy as sa

    from models import CaseRevision, ClinicalCase, db
    app = make_app(data_dir, database_url)
    with app.app_context():
        count = db.session.get(ClinicalCase, case_id).revision_count
        rows = db.session.execute(sa.select(sa.func.count()).where(
            CaseRevision.case_id == case_id)).scalar_one()
        indexes = db.session.execute(sa.select(sa.func.max(CaseRevision.revision_index)).where(
            CaseRevision.case_id == case_id)).scalar_one()
        db.session.remove()
        db.engine.dispose()
    return count, rows, indexes


def append_revisions(port, token, case_id, clients=8, per_client=25):
    """8 threads, one keep-alive connection each; returns (revisions/s, statuses)."""
    body = json.dumps({"description": "bench", "attributes": {"n": 1}, "status": "draft",
                       "series": [{"seriesUid": "1.2.840.99.0", "labels": [
                           {"type": "point", "data": {"location": [1, 2, 3]}}]}]})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    statuses, lock = {}, threading.Lock()
    barrier = threading.Barrier(clients)

    def work():
        conn = http.client.HTTPConnection("127.0.0.1", port)
        barrier.wait()
        for _ in range(per_client):
            conn.request("POST", f"/api/cases/{case_id}/revision", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1

    threads = [threading.Thread(target=work) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return clients * per_client / elapsed, statuses


# --- the run ----------------------------------------------------------------------------

def start_floor(work, log):
    perf = os.path.join(work, "floor")
    os.makedirs(perf, exist_ok=True)
    env = {"PERF": perf}
    subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), "floor_app.py", "init", "1000"],
                   cwd=SHARED_BENCH, env={**os.environ, **env}, check=True, stdout=log,
                   stderr=log)
    port = free_port()
    process = gunicorn("floor_app:app", SHARED_BENCH, env, port, log)
    wait_for(port, "/api/series-static")
    return process, port


def bench_backend(label, work, database_url, sizes, seconds, clients, rounds, floor_port, log):
    """Generate every size, serve each, then measure them and the floor in interleaved
    rounds (so that the load of the machine drifts alike for all); report medians."""
    floor_headers = {"Authorization": f"Bearer {FLOOR_TOKEN}"}
    path = search_path()
    targets, servers = {}, []
    try:
        for size in sizes:
            data_dir = os.path.join(work, f"{label.split()[0]}-{size}")
            started = time.time()
            url = size_database(database_url, size)
            token, case_id = generate(data_dir, url, size)
            print(f"[{label}] generated {size:,} cases in {time.time() - started:.1f} s",
                  flush=True)
            port = free_port()
            env = {"CIRCUS_DATA_DIR": data_dir}
            if url:
                env["DATABASE_URL"] = url
            servers.append(gunicorn("app:create_app()", ROOT, env, port, log))
            targets[size] = {"port": port, "headers": {"Authorization": f"Bearer {token}"},
                             "data_dir": data_dir, "case_id": case_id, "url": url}
            wait_for(port, "/api/status")
        return _measure(label, targets, sizes, path, seconds, clients, rounds, floor_port,
                        floor_headers)
    finally:
        for server in servers:
            stop(server)


def _measure(label, targets, sizes, path, seconds, clients, rounds, floor_port, floor_headers):
    for size, target in targets.items():
        conn = http.client.HTTPConnection("127.0.0.1", target["port"])
        conn.request("GET", path, headers=target["headers"])
        sample = json.loads(conn.getresponse().read())
        conn.close()
        if "items" not in sample:
            raise RuntimeError(f"search failed: {sample}")
        target["totalItems"] = sample["totalItems"]
        load(target["port"], path, target["headers"], 1, clients)  # warm-up
    load(floor_port, "/api/series", floor_headers, 1, clients)
    per_round = []
    for _round in range(rounds):
        row = {"floor": load(floor_port, "/api/series", floor_headers, seconds, clients),
               "floor_p50": load(floor_port, "/api/series", floor_headers, seconds / 2, 1)}
        for size, target in targets.items():
            row[size] = load(target["port"], path, target["headers"], seconds, clients)
            row[f"{size}_p50"] = load(target["port"], path, target["headers"], seconds / 2, 1)
        per_round.append(row)
    results = {}
    for size, target in targets.items():
        ratios = [r[size][0] / r["floor"][0] for r in per_round]
        bad = {k: v for r in per_round for k, v in r[size][2].items() if k != 200}
        results[size] = {
            "rps": statistics.median(r[size][0] for r in per_round),
            "floor_rps": statistics.median(r["floor"][0] for r in per_round),
            "ratio": statistics.median(ratios),
            "p50_ms": statistics.median(r[f"{size}_p50"][1] for r in per_round),
            "floor_p50_ms": statistics.median(r["floor_p50"][1] for r in per_round)}
        res = results[size]
        print(f"[{label}] {size:>7,} cases: GET /api/cases {res['rps']:6.0f} req/s, floor "
              f"{res['floor_rps']:6.0f} req/s; ratio median {res['ratio']:.2f} (rounds: "
              + ", ".join(f"{x:.2f}" for x in ratios) + f"); single-client p50 "
              f"{res['p50_ms']:.2f} ms (floor {res['floor_p50_ms']:.2f} ms); totalItems "
              f"{target['totalItems']}; non-200: {bad or 'none'}", flush=True)
    if len(targets) > 1:
        small, large = sizes[0], sizes[-1]
        p50_ratios = [r[f"{large}_p50"][1] / r[f"{small}_p50"][1] for r in per_round]
        print(f"[{label}] p50 at {large:,} / p50 at {small:,}: median "
              f"{statistics.median(p50_ratios):.2f} (rounds: "
              + ", ".join(f"{x:.2f}" for x in p50_ratios) + ") (goal <= 1.2)", flush=True)
    first = targets[sizes[0]]
    before = revision_count(first["data_dir"], first["url"], first["case_id"])
    rate, statuses = append_revisions(first["port"], first["headers"]["Authorization"][7:],
                                      first["case_id"])
    after = revision_count(first["data_dir"], first["url"], first["case_id"])
    lost = before[0] + statuses.get(201, 0) - after[0]
    print(f"[{label}] revisions: {rate:.0f}/s by 8 clients on one case; answers {statuses}; "
          f"count before {before[0]} (rows {before[1]}), after {after[0]} (rows {after[1]}, "
          f"max index {after[2]}); lost {lost}", flush=True)
    results["revisions"] = {"per_second": rate, "before": before, "after": after, "lost": lost}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg", action="store_true", help="also run on a throwaway PostgreSQL")
    parser.add_argument("--pg-random-page-cost", type=float, default=None,
                        help="planner setting for the app's connections (e.g. 1.1 for SSD or "
                             "cached data; PostgreSQL's default is 4)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--served", action="store_true",
                        help="run both apps with the served gunicorn.conf.py (gthread) "
                             "instead of plain sync workers")
    args = parser.parse_args()
    global GUNICORN_CONFIG
    if args.served:
        GUNICORN_CONFIG = os.path.join(ROOT, "gunicorn.conf.py")
    sizes = [int(s) for s in args.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="bench-cases-")
    log = open(os.path.join(work, "servers.log"), "w")
    print(f"work directory {work}; {os.cpu_count()} CPUs", flush=True)
    floor, floor_port = start_floor(work, log)
    pg_dir = None
    try:
        bench_backend("sqlite", work, None, sizes, args.seconds, args.clients, args.rounds,
                      floor_port, log)
        if args.pg:
            out = subprocess.run(["bash", PG_TOOL, "start"], check=True, capture_output=True,
                                 text=True).stdout
            exports = dict(line.split(" ", 1)[1].split("=", 1) for line in out.splitlines()
                           if line.startswith("export "))
            pg_dir = exports["PG_THROWAWAY_DIR"]
            url = exports["DATABASE_URL"]
            label = "postgresql"
            if args.pg_random_page_cost is not None:
                url += f"?options=-c%20random_page_cost%3D{args.pg_random_page_cost}"
                label += f" random_page_cost={args.pg_random_page_cost}"
            bench_backend(label, work, url, sizes, args.seconds, args.clients, args.rounds,
                          floor_port, log)
    finally:
        stop(floor)
        if pg_dir:
            subprocess.run(["bash", PG_TOOL, "stop", pg_dir], check=False)
        log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
