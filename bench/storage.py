"""Storage benchmark: the data directory (file://) beside an S3 store, and two hosts beside
one, measured in the same run.

Needs a throwaway S3 store and PostgreSQL (the store must be shared by the hosts, so the
comparison runs on PostgreSQL throughout)::

    eval "$(../shared/tools/s3-throwaway.sh start)"; eval "$(../shared/tools/pg-throwaway.sh start)"
    .venv/bin/python bench/storage.py [--slices 200] [--seconds 10]

Figures:
  store: file:// vs s3://   zip ingest of the 200-slice 512x512 CT (instances/s until the
                            task is finished), /rs first open of it (seconds until the whole
                            volume is sent by a freshly started server: nothing cached),
                            export-cs-volume of it (MB of archive per second until finished)
  hosts: 2 vs 1 (s3://)     zip ingest instances/s (four CT zips at once, spread over the
                            hosts), GET /api/series requests/s (16 client threads spread over
                            the hosts for ``--seconds``)
Every API server runs gunicorn with gunicorn.conf.py and one ``flask --app app worker``.
"""
import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.synthetic_ct import write_ct_series  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flask_cli(env, *args):
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


class Host:
    """One API server (gunicorn) and one worker with a data folder of their own."""

    def __init__(self, env, folder):
        self.env = {**env, "CIRCUS_DATA_DIR": folder}
        self.base = f"http://127.0.0.1:{free_port()}"
        self.procs = []

    def start(self):
        logs = open(os.path.join(self.env["CIRCUS_DATA_DIR"], "..", "log.txt"), "ab")
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "gunicorn", "-b", self.base[7:],
                              "--no-control-socket", "app:create_app()"], cwd=ROOT,
                             env=self.env, stdout=logs, stderr=subprocess.STDOUT),
            subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "worker"],
                             cwd=ROOT, env=self.env, stdout=logs, stderr=subprocess.STDOUT)]
        for _ in range(600):
            try:
                if requests.get(self.base + "/api/status", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=60)


@contextlib.contextmanager
def scratch_database(url):
    """A fresh database beside DATABASE_URL's (its URL), dropped afterwards."""
    import sqlalchemy as sa
    name = "circus_bench_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)
                             if url.startswith("postgresql://") else url,
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def ct_zip(folder, slices):
    uid = "1.2.826.0.1.3680043.10.999." + str(uuid.uuid4().int % 10**15)
    paths = write_ct_series(os.path.join(folder, uid), slices, uid, lambda i: f"{i:04d}.dcm")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for path in paths:
            archive.write(path, os.path.basename(path))
    shutil.rmtree(os.path.join(folder, uid))
    return uid, out.getvalue()


def wait_task(host, token, task_id):
    while True:
        task = requests.get(f"{host.base}/api/tasks/{task_id}",
                            headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        if task["status"] != "processing":
            if task["status"] != "finished":
                raise RuntimeError(task)
            return task
        time.sleep(0.05)


def ingest(hosts, token, zips):
    """Instances/s of importing ``zips`` (one request each, spread over the hosts)."""
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    ids = []
    for i, (_uid, body) in enumerate(zips):
        host = hosts[i % len(hosts)]
        res = requests.post(f"{host.base}/api/series/domain/default", headers=headers,
                            files=[("files", ("ct.zip", body, "application/zip"))], timeout=300)
        ids.append((host, res.json()["taskId"]))
    for host, task_id in ids:
        wait_task(host, token, task_id)
    return sum(body.count(b"DICM") for _uid, body in zips) / (time.perf_counter() - start)


def rs_first_open(host, token, uid):
    start = time.perf_counter()
    res = requests.get(f"{host.base}/rs/series/{uid}/volume?token={token}", timeout=300)
    res.raise_for_status()
    return time.perf_counter() - start


def export_rate(host, token, uid, slices):
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    res = requests.post(f"{host.base}/api/series/export-cs-volume", headers=headers, json={
        "series": [{"seriesUid": uid, "partialVolumeDescriptor":
                    {"start": 1, "end": slices, "delta": 1}}]}, timeout=60)
    task_id = res.json()["taskId"]
    wait_task(host, token, task_id)
    elapsed = time.perf_counter() - start
    size = len(requests.get(f"{host.base}/api/tasks/{task_id}/download", headers=headers,
                            timeout=300).content)
    return size / 1e6 / elapsed


def search_rate(hosts, token, seconds, threads=16):
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(host):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        done = 0
        while time.monotonic() < stop:
            session.get(f"{host.base}/api/series", timeout=30).raise_for_status()
            done += 1
        with lock:
            count[0] += done
    workers = [threading.Thread(target=client, args=(hosts[i % len(hosts)],))
               for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return count[0] / seconds


def grant_download(env):
    """Give circus the downloadVolume privilege (exports), in the hosts' database."""
    from app import create_app
    from models import Group, User, db
    app = create_app({"CIRCUS_DATA_DIR": env["CIRCUS_DATA_DIR"],
                      "DATABASE_URL": env["DATABASE_URL"], "STORAGE_URL": "file://"})
    with app.app_context():
        group = Group(group_name="bench", privileges=["downloadVolume"], domains=["default"])
        db.session.add(group)
        db.session.flush()
        user = db.session.get(User, "circus@circus.example.com")
        user.groups = list(user.groups or []) + [group.group_id]
        db.session.commit()
        db.engine.dispose()


def setup(tmp, storage_url, db_url, n_hosts):
    env = {**os.environ, "DATABASE_URL": db_url, "CIRCUS_STORAGE_URL": storage_url,
           "CIRCUS_S3_CREATE_BUCKET": "1", "CIRCUS_WORKER_POLL_INTERVAL": "0.05"}
    folders = [tempfile.mkdtemp(dir=tmp) for _ in range(n_hosts)]
    hosts = [Host(env, os.path.join(f, "data")) for f in folders]
    for host in hosts:
        os.makedirs(host.env["CIRCUS_DATA_DIR"])
    flask_cli(hosts[0].env, "init-db")
    grant_download(hosts[0].env)
    token = flask_cli(hosts[0].env, "add-permanent-token", "circus").strip().splitlines()[-1]
    return [h.start() for h in hosts], token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if not os.environ.get("CIRCUS_S3_ENDPOINT_URL") or not os.environ.get("DATABASE_URL"):
        sys.exit("Needs CIRCUS_S3_ENDPOINT_URL (s3-throwaway.sh) and DATABASE_URL "
                 "(pg-throwaway.sh): see the docstring.")
    tmp = tempfile.mkdtemp(prefix="bench-storage-")
    try:
        print(f"{'':28}{'file://':>12}{'s3://':>12}{'ratio':>8}")
        rows = {}
        for store in ("file://", f"s3://circus-bench/{uuid.uuid4().hex[:8]}"):
            with scratch_database(os.environ["DATABASE_URL"]) as url:
                hosts, token = setup(tmp, store, url, 1)
                try:
                    uid, body = ct_zip(tmp, args.slices)
                    rows.setdefault("zip ingest (instances/s)", []).append(
                        ingest(hosts, token, [(uid, body)]))
                    hosts[0].stop()  # a fresh server: nothing of the series in memory
                    hosts[0].start()
                    rows.setdefault("/rs first open (s)", []).append(
                        rs_first_open(hosts[0], token, uid))
                    rows.setdefault("export (MB/s)", []).append(
                        export_rate(hosts[0], token, uid, args.slices))
                finally:
                    for host in hosts:
                        host.stop()
        for label, (local, s3) in rows.items():
            print(f"{label:28}{local:12.2f}{s3:12.2f}{s3 / local:8.2f}")
        print(f"\n{'s3://, PostgreSQL':28}{'1 host':>12}{'2 hosts':>12}{'ratio':>8}")
        rows = {}
        for n in (1, 2):
            with scratch_database(os.environ["DATABASE_URL"]) as url:
                hosts, token = setup(tmp, f"s3://circus-bench/{uuid.uuid4().hex[:8]}", url, n)
                try:
                    zips = [ct_zip(tmp, args.slices) for _ in range(4)]
                    rows.setdefault("zip ingest (instances/s)", []).append(
                        ingest(hosts, token, zips))
                    rows.setdefault("GET /api/series (req/s)", []).append(
                        search_rate(hosts, token, args.seconds))
                finally:
                    for host in hosts:
                        host.stop()
        for label, (one, two) in rows.items():
            print(f"{label:28}{one:12.2f}{two:12.2f}{two / one:8.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
