"""Short-request throughput of the API, as ratios to the floor app (../shared/bench).

    .venv/bin/python bench/api_rps.py [--seconds 5] [--reps 3] [--connections 4]

Starts on loopback, in a scratch directory, our app (SQLite, a permanent token for circus,
30 extra users) and ../shared/bench/floor_app.py (1,000 series, token ``secret``) under the
same gunicorn settings, twice: the served ``gunicorn.conf.py``, then plain sync workers
(``-w 2``). `wrk` (Debian package wrk) loads one endpoint at a time from a second process;
endpoints alternate within each repetition and the medians are reported.
Goals: GET /api/status >= 0.9x the floor's /api/series-static; GET /api/login-info and
GET /api/admin/users?limit=20 (permanent token) >= 0.8x the floor's /api/series (token + 20 rows).
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadgen import wrk

ROOT = Path(__file__).resolve().parents[1]
FLOOR_DIR = ROOT.parent / "shared" / "bench"
SERVED_CONF = ROOT / "gunicorn.conf.py"
EXTRA_USERS = 30
FLOOR_SERIES = 1000
# (label, server, path, needs a token)
ENDPOINTS = [
    ("GET /api/status", "ours", "/api/status", False),
    ("floor GET /api/series-static", "floor", "/api/series-static", False),
    ("GET /api/login-info", "ours", "/api/login-info", True),
    ("GET /api/admin/users?limit=20", "ours", "/api/admin/users?limit=20", True),
    ("floor GET /api/series", "floor", "/api/series", True),
]
GOALS = [  # (ours, floor, minimum ratio)
    ("GET /api/status", "floor GET /api/series-static", 0.9),
    ("GET /api/login-info", "floor GET /api/series", 0.8),
    ("GET /api/admin/users?limit=20", "floor GET /api/series", 0.8),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(argv, env, cwd=ROOT):
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


ADD_USERS = """
import sys
from app import create_app
from models import User, db
with create_app().app_context():
    db.session.add_all(User(user_email=f"user{i}@example.com", login_id=f"user{i}",
                            password="!", groups=[2]) for i in range(int(sys.argv[1])))
    db.session.commit()
"""


def prepare(scratch):
    """Initialise both databases; return (environments, tokens)."""
    ours = {**os.environ, "CIRCUS_DATA_DIR": str(scratch / "data")}
    ours.pop("DATABASE_URL", None)  # the floor is SQLite: compare like with like
    flask = [sys.executable, "-m", "flask", "--app", "app"]
    run(flask + ["init-db"], ours)
    token = run(flask + ["add-permanent-token", "circus"], ours).strip().splitlines()[-1]
    run([sys.executable, "-c", ADD_USERS, str(EXTRA_USERS)], ours)
    floor = {**os.environ, "PERF": str(scratch / "floor")}
    os.makedirs(floor["PERF"])
    run([sys.executable, str(FLOOR_DIR / "floor_app.py"), "init", str(FLOOR_SERIES)], floor,
        cwd=FLOOR_DIR)
    return {"ours": ours, "floor": floor}, {"ours": token, "floor": "secret"}


def start_servers(conf, envs, scratch):
    """Start our app and the floor under the gunicorn config file `conf`; return their URLs."""
    procs, bases = [], {}
    for name, app_ref, extra in [("ours", "app:create_app()", []),
                                 ("floor", "floor_app:app", ["--chdir", str(FLOOR_DIR)])]:
        port = free_port()
        log = open(scratch / f"{name}-{conf.stem}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{port}",
             "--no-control-socket", *extra, app_ref],
            cwd=ROOT, env=envs[name], stdout=log, stderr=subprocess.STDOUT))
        bases[name] = f"http://127.0.0.1:{port}"
    for base, path in [(bases["ours"], "/api/status"), (bases["floor"], "/api/series-static")]:
        wait_for(base + path)
    return procs, bases


def wait_for(url, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer in {seconds} s")


def check(url, token):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            sys.exit(f"{url} answered {response.status}")


def measure(label, conf, envs, tokens, scratch, args):
    procs, bases = start_servers(conf, envs, scratch)
    try:
        for _, server, path, auth in ENDPOINTS:
            check(bases[server] + path, tokens[server])
            wrk(bases[server] + path, tokens[server] if auth else None, 1, args.connections)
        samples = {name: [] for name, *_ in ENDPOINTS}
        for _ in range(args.reps):
            for name, server, path, auth in ENDPOINTS:
                samples[name].append(wrk(bases[server] + path, tokens[server] if auth else None,
                                         args.seconds, args.connections))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    report(label, {name: [statistics.median(col) for col in zip(*runs)]
                   for name, runs in samples.items()})


def report(label, medians):
    print(f"\n== {label}")
    print(f"{'endpoint':34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rps, p50, p99) in medians.items():
        print(f"{name:34} {rps:8.0f} {p50:8.2f} {p99:8.2f}")
    for ours, floor, goal in GOALS:
        ratio = medians[ours][0] / medians[floor][0]
        verdict = "ok" if ratio >= goal else "BELOW GOAL"
        print(f"ratio {ours} / {floor}: {ratio:.2f} (goal >= {goal}) {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="duration of one wrk run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    scratch = Path(tempfile.mkdtemp(prefix="circus-bench-"))
    try:
        envs, tokens = prepare(scratch)
        sync_conf = scratch / "sync.conf.py"
        sync_conf.write_text("workers = 2\nworker_class = 'sync'\n")
        print(f"wrk -t1 -c{args.connections}, {args.seconds} s per run, median of {args.reps}; "
              f"{os.cpu_count()} cores")
        if SERVED_CONF.exists():
            measure("served gunicorn.conf.py", SERVED_CONF, envs, tokens, scratch, args)
        else:
            print("\n(no gunicorn.conf.py: the served configuration is gunicorn's default)")
        measure("plain sync workers (-w 2)", sync_conf, envs, tokens, scratch, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
