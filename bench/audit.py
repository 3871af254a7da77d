"""The audit trail's cost (issue 17): the same runs with the audit on and off.

Figures:
  search   GET /api/series?limit=20 showing patient information (so every answer is
           audited): requests/s with the audit on / off, served gunicorn.conf.py, `wrk`
           (Debian package wrk) from a second process, runs alternating, medians. Goal >= 0.9.
  zip      zip ingest (``--small`` small instances of ../shared/bench/gen_dicom.py, one
           upload, task polled to its end; bench/ingest.py's harness): instances/s on / off.
           Goal >= 0.95.
  size     bytes the audit table grows by per 10,000 such searches (SQLite file, checkpointed).
  verify   ``flask --app app audit-verify`` on ``--records`` chained records (default
           1,000,000), written straight into a scratch SQLite database: seconds.

Usage (from the project root)::

    .venv/bin/python bench/audit.py                         # everything (~10 min on 2 cores)
    .venv/bin/python bench/audit.py --only search,size --seconds 3 --reps 1   # a smoke run
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import wait_up, wrk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app import create_app  # noqa: E402
from models import db  # noqa: E402
from tests.factories import make_token  # noqa: E402

SERIES = 1000
FLASK = [sys.executable, "-m", "flask", "--app", "app"]

SEED = """
import sys
from app import create_app
from models import User, db
from tests.factories import make_series
with create_app().app_context():
    db.session.get(User, "circus@circus.example.com").preferences = {"personalInfoView": True}
    for i in range(int(sys.argv[1])):
        make_series(f"1.2.840.113619.2.55.3.604688119.969.{i}", images="1-100",
                    patient_info={"patientId": f"P{i:06d}", "patientName": "BENCH^PATIENT",
                                  "age": 60, "sex": "O"})
    db.session.commit()
"""


def run(argv, env):
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(directory, audit_on):
    """A data directory with SERIES series carrying patient information; (env, token)."""
    env = {**os.environ, "CIRCUS_DATA_DIR": str(directory),
           "CIRCUS_AUDIT_ENABLED": "1" if audit_on else "0"}
    env.pop("DATABASE_URL", None)  # SQLite, as the reference runs
    run(FLASK + ["init-db"], env)
    token = run(FLASK + ["add-permanent-token", "circus"], env).strip().splitlines()[-1]
    run([sys.executable, "-c", SEED, str(SERIES)], env)
    return env, token


def start(env):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}",
                             "--no-control-socket", "app:create_app()"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_up(port, "/api/status")
    return proc, f"http://127.0.0.1:{port}"


def audit_rows(env):
    out = run([sys.executable, "-c", "from app import create_app\nfrom models import AuditEvent,"
               " db\nwith create_app().app_context():\n print(db.session.execute(db.select("
               "db.func.count()).select_from(AuditEvent)).scalar())"], env)
    return int(out.strip().splitlines()[-1])


def bench_search(scratch, args):
    setups = {on: prepare(scratch / f"search-{'on' if on else 'off'}", on) for on in (True, False)}
    servers = {on: start(env) for on, (env, _token) in setups.items()}
    path = "/api/series?limit=20"
    try:
        for on, (_proc, base) in servers.items():
            wrk(base + path, setups[on][1], 1, args.connections)  # warm up
        samples = {True: [], False: []}
        for _ in range(args.reps):
            for on in (False, True):
                samples[on].append(wrk(servers[on][1] + path, setups[on][1], args.seconds,
                                       args.connections)[0])
    finally:
        for proc, _base in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    rows = audit_rows(setups[True][0])
    on, off = statistics.median(samples[True]), statistics.median(samples[False])
    ratio = on / off
    print(f"search  GET {path} (patientInfo shown): on {on:.0f} req/s, off {off:.0f} req/s, "
          f"ratio {ratio:.2f} (goal >= 0.9) {'ok' if ratio >= 0.9 else 'BELOW GOAL'}; "
          f"{rows} audit records written")


def bench_zip(scratch, args):
    import ingest
    data = ingest.ensure_data(args.perf)
    archive = ingest.make_zip(os.path.join(args.perf, f"small-{args.small}.zip"),
                              ingest.files_of(os.path.join(data, "extra9k"), args.small))
    results = {True: [], False: []}
    for _ in range(args.reps):
        for on in (False, True):
            os.environ["CIRCUS_AUDIT_ENABLED"] = "1" if on else "0"
            ours = ingest.Ours(str(scratch / "zip"))
            try:
                seconds, _message = ours.upload_zip(archive)
            finally:
                ours.stop()
            results[on].append(args.small / seconds)
    os.environ.pop("CIRCUS_AUDIT_ENABLED", None)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    ratio = on / off
    print(f"zip     {args.small} small instances: on {on:.0f} inst/s, off {off:.0f} inst/s, "
          f"ratio {ratio:.2f} (goal >= 0.95) {'ok' if ratio >= 0.95 else 'BELOW GOAL'}")


def bench_size(scratch, args):
    """In-process (the test client): 10,000 audited searches, the file's growth."""
    env, _token = prepare(scratch / "size", True)
    os.environ["CIRCUS_DATA_DIR"] = env["CIRCUS_DATA_DIR"]
    app = create_app({"CIRCUS_DATA_DIR": env["CIRCUS_DATA_DIR"]})
    with app.app_context():
        token = make_token("circus@circus.example.com")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    database = Path(env["CIRCUS_DATA_DIR"]) / "circus.db"

    def size():
        with app.app_context():
            with db.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        return database.stat().st_size
    before = size()
    for n in range(args.searches):
        res = client.get(f"/api/series?limit=20&page={n % 50 + 1}", headers=headers)
        if res.status_code != 200:
            sys.exit(f"search answered {res.status_code}")
    grown = (size() - before) * 10000 / args.searches
    print(f"size    audit table growth per 10,000 searches of 20 series: {grown / 1e6:.1f} MB "
          f"({grown / 10000:.0f} bytes per record)")


WRITE_CHAIN = """
import sys, time
from datetime import timedelta
import audit
from app import create_app
from models import AuditEvent, AuditHead, db, utcnow
total, batch = int(sys.argv[1]), 20000
uids = [f"1.2.840.113619.2.55.3.604688119.969.{i}" for i in range(20)]
with create_app().app_context():
    db.session.execute(db.delete(AuditEvent))
    seq, prev, at = 0, audit.GENESIS, utcnow() - timedelta(days=30)
    while seq < total:
        pending = [{"at": at + timedelta(microseconds=seq + i), "user_email": "bob@example.com",
                    "token_id": "f" * 40, "client": "127.0.0.1", "action": "series-search",
                    "target_type": "series", "target_id": None, "outcome": "success",
                    "status": 200, "detail": audit._canonical({"seriesUids": uids})}
                   for i in range(min(batch, total - seq))]
        rows = audit._chained(pending, seq, prev)
        db.session.execute(db.insert(AuditEvent), rows)
        seq, prev = rows[-1]["seq"], rows[-1]["hash"]
    db.session.merge(AuditHead(id=1, seq=seq, hash=prev))
    db.session.commit()
"""


def bench_verify(scratch, args):
    env = {**os.environ, "CIRCUS_DATA_DIR": str(scratch / "verify")}
    env.pop("DATABASE_URL", None)
    run(FLASK + ["init-db"], env)
    started = time.perf_counter()
    run([sys.executable, "-c", WRITE_CHAIN, str(args.records)], env)
    written = time.perf_counter() - started
    started = time.perf_counter()
    out = run(FLASK + ["audit-verify"], env)
    seconds = time.perf_counter() - started
    if "intact" not in out:
        sys.exit(f"audit-verify: {out}")
    print(f"verify  audit-verify of {args.records:,} records: {seconds:.1f} s "
          f"({args.records / seconds:,.0f} records/s; writing them took {written:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="search,zip,size,verify")
    parser.add_argument("--seconds", type=int, default=5, help="duration of one wrk run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections")
    parser.add_argument("--small", type=int, default=3000, help="instances in the zip")
    parser.add_argument("--perf", default="/tmp/perf-ingest", help="bench/ingest.py's data")
    parser.add_argument("--searches", type=int, default=10000)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    only = set(args.only.split(","))
    if "search" in only and shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    scratch = Path(tempfile.mkdtemp(prefix="circus-bench-audit-"))
    print(f"audit benchmark, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for name, bench in (("search", bench_search), ("zip", bench_zip), ("size", bench_size),
                            ("verify", bench_verify)):
            if name in only:
                bench(scratch, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
