"""Benchmark of the plug-in job queue and runner (issue 6).

Setup (scratch folder under $PERF or a temporary one): the shared head-first MR series
(10 slices 320x260: "a small series"), a remote plug-in served on loopback by
tests/remote_plugin_server.py in a process of its own (it answers at once), a user who may
run it. The API is called in-process (Flask test client); the worker is the real
``flask --app app worker`` process on the same database.

1. Throughput: with the manager stopped, JOBS jobs are posted; then the manager is switched
   on and the worker (PLUGIN_JOB_CONCURRENCY = 1, then 4) runs them all. jobs/s =
   JOBS / (last finishedAt - first startedAt), from the job rows.
2. Latency: with an idle worker (poll interval POLL), SAMPLES jobs are posted one at a time
   at random moments; the delay POST -> processing (startedAt - createdAt) and
   POST -> finished (finishedAt - createdAt), medians.
3. Input preparation: a synthetic 300-slice 512x512 int16 CT; MB/s of .raw written by
   plugins.runner.prepare_input (volumes.write_plugin_input), beside ``cp`` of a file of the
   same bytes on the same disk in the same run.

Usage (from the project root)::

    .venv/bin/python bench/jobs.py
    .venv/bin/python bench/jobs.py --jobs 200 --poll 1.0 --samples 30 --slices 300
"""
import argparse
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import socket
import threading
import time
import warnings
from pathlib import Path

import sqlalchemy as sa


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import plugins.jobs  # noqa: E402
import storage  # noqa: E402
from app import create_app  # noqa: E402
from bench.synthetic_ct import write_ct_series  # noqa: E402
from cli import create_initial_data  # noqa: E402
from models import PluginJob, SystemState, db  # noqa: E402
from plugins import definitions, runner  # noqa: E402
from plugins.job_source import _heartbeat_key  # noqa: E402
from tests.factories import make_series, make_token, make_user  # noqa: E402
from tests.plugin_helpers import grant, remote_definition, store_sample_series  # noqa: E402
SHARED_DICOM = os.path.join(os.path.dirname(ROOT), "shared", "dicom", "head-first")
CT_UID = "1.2.826.0.1.3680043.10.999.306"

SERVER_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.remote_plugin_server import RemotePlugin
plugin = RemotePlugin(secret="bench").start()
print(plugin.endpoint, flush=True)
while True:
    time.sleep(3600)
"""


def start_plugin_server():
    process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT.format(root=ROOT)],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def make_app(data_dir, poll):
    return create_app({"CIRCUS_DATA_DIR": data_dir, "WORKER_POLL_INTERVAL": poll,
                       "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000"})


def setup(app, endpoint):
    """Initial data, a runner user with a token, the small series, the remote plug-in."""
    with app.app_context():
        create_initial_data()
        make_user("runner@example.com", "runner", groups=[2])
        db.session.commit()
        token = make_token("runner@example.com")
        series_uid = store_sample_series(Path(SHARED_DICOM))
        plugin_id = definitions.create_plugin(remote_definition(
            endpoint=endpoint, secret="bench"))
        grant("runner@example.com", plugin_id)
    return {"Authorization": f"Bearer {token}"}, series_uid, plugin_id


def start_worker(data_dir, poll, concurrency):
    env = dict(os.environ, CIRCUS_DATA_DIR=data_dir, CIRCUS_WORKER_POLL_INTERVAL=str(poll),
               CIRCUS_PLUGIN_JOB_CONCURRENCY=str(concurrency))
    return subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "flask"), "--app", "app",
                             "worker"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(data_dir, f"worker-{concurrency}.log"), "a"))


def cpu_seconds(pid, descendants=False):
    """User + system CPU seconds a process (and its living descendants: the worker's job
    processes) has used so far (Linux /proc)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree = {pid}
    grown = descendants  # (a child's PID may be lower than its parent's: repeat until stable)
    while grown:
        grown = False
        for other, (parent, _) in stats.items():
            if parent in tree and other not in tree:
                tree.add(other)
                grown = True
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_ready(app, worker, timeout=120):
    """Wait until the worker has its job pool (its heartbeat row appears then)."""
    key = _heartbeat_key(f"{socket.gethostname()}:{worker.pid}")
    deadline = time.monotonic() + timeout
    with app.app_context():
        while db.session.get(SystemState, key) is None:
            db.session.rollback()
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("The worker did not start.")
            time.sleep(0.1)
        db.session.rollback()


def stop(process):
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def post_job(client, headers, plugin_id, series_uid):
    res = client.post("/api/plugin-jobs", headers=headers, json={
        "pluginId": plugin_id, "force": True,
        "series": [{"seriesUid": series_uid, "partialVolumeDescriptor": "auto"}]})
    if res.status_code != 201:
        raise SystemExit(f"POST /api/plugin-jobs failed: {res.status_code} {res.get_json()}")
    return res.get_json()["jobId"]


def job_rows(app, ids):
    with app.app_context():
        rows = db.session.execute(db.select(PluginJob).where(PluginJob.job_id.in_(ids))).scalars()
        result = {j.job_id: (j.status, j.created_at, j.started_at, j.finished_at) for j in rows}
        db.session.rollback()
        return result


def wait_done(app, ids, timeout=1800):
    """The rows of ``ids`` once all have ended. The poll is one COUNT every 100 ms, so the
    bench takes little CPU from the worker it measures (the figures come from the rows'
    timestamps, not from when the end is seen)."""
    deadline = time.monotonic() + timeout
    with app.app_context():
        pending = sa.select(sa.func.count()).where(
            PluginJob.job_id.in_(ids), PluginJob.status.not_in(("finished", "failed")))
        while time.monotonic() < deadline:
            with db.engine.connect() as conn:
                if conn.execute(pending).scalar() == 0:
                    return job_rows(app, ids)
            time.sleep(0.1)
    raise SystemExit("Jobs did not finish in time.")


def switch(app, status):
    with app.app_context():
        plugins.jobs.set_manager_status(status)


def throughput(app, client, headers, plugin_id, series_uid, data_dir, jobs, poll, concurrency,
               server):
    """(jobs/s, failed jobs, CPU ms per job of the worker, the plug-in server and this
    bench process while the jobs ran)."""
    switch(app, "stopped")
    ids = [post_job(client, headers, plugin_id, series_uid) for _ in range(jobs)]
    worker = start_worker(data_dir, poll, concurrency)
    wait_ready(app, worker)
    time.sleep(1)  # worker idle
    pids = (worker.pid, server.pid, os.getpid())
    trees = (True, False, False)
    before = [cpu_seconds(pid, tree) for pid, tree in zip(pids, trees)]
    switch(app, "running")
    try:
        rows = wait_done(app, ids)
        cpu = [(cpu_seconds(pid, tree) - b) * 1000 / jobs
               for pid, tree, b in zip(pids, trees, before)]
    finally:
        stop(worker)
    failed = [r for r in rows.values() if r[0] != "finished"]
    first = min(r[2] for r in rows.values())
    last = max(r[3] for r in rows.values() if r[3] is not None)
    return jobs / (last - first).total_seconds(), len(failed), cpu


def latency(app, client, headers, plugin_id, series_uid, data_dir, samples, poll):
    worker = start_worker(data_dir, poll, 1)
    time.sleep(2)
    to_processing, to_finished = [], []
    try:
        for _ in range(samples):
            time.sleep(random.uniform(0, 1.5 * poll))  # any moment of the poll cycle
            job_id = post_job(client, headers, plugin_id, series_uid)
            status, created, started, finished = wait_done(app, [job_id])[job_id]
            if status != "finished":
                raise SystemExit(f"Job {job_id} ended {status}.")
            to_processing.append((started - created).total_seconds())
            to_finished.append((finished - created).total_seconds())
    finally:
        stop(worker)
    return statistics.median(to_processing), statistics.median(to_finished), max(to_processing)


def queue_capacity(app, jobs, threads):
    """Jobs/s the queue alone moves (claim + finish, no work) with ``threads`` claimers."""
    with app.app_context():
        db.session.execute(db.update(PluginJob).where(PluginJob.queue_state.is_not(None))
                           .values(queue_state=None, status="cancelled"))
        template = db.session.execute(db.select(PluginJob).limit(1)).scalar_one()
        db.session.add_all(PluginJob(
            job_id=f"{template.job_id[:20]}q{threads}{i:04d}", plugin_id=template.plugin_id,
            user_email=template.user_email, status="in_queue", series=template.series,
            priority=0, queue_state="wait", queued_at=template.created_at)
            for i in range(jobs))
        db.session.commit()

    def claimer(name):
        with app.app_context():
            while (job_id := plugins.jobs.claim_next_job(name)) is not None:
                plugins.jobs.finish_job(job_id, {})
    started = time.perf_counter()
    workers = [threading.Thread(target=claimer, args=(f"q{i}",)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return jobs / (time.perf_counter() - started)


def generate_ct(folder, slices):
    """The synthetic CT of this bench, written as stored instances (foot-first z order)."""
    write_ct_series(folder, slices, CT_UID, lambda i: f"{i + 1:08d}.dcm", z_step=-1.0, seed=3,
                    patient_id="BENCH6")


def input_preparation(app, scratch, slices):
    with app.app_context():
        generate_ct(storage.series_dir(CT_UID), slices)
        make_series(CT_UID, images=f"1-{slices}", modality="CT")
        db.session.commit()
        in_dir = os.path.join(scratch, "prep-in")
        entry = {"seriesUid": CT_UID,
                 "partialVolumeDescriptor": {"start": 1, "end": slices, "delta": 1}}
        with runner.JobLog(os.path.join(scratch, "prep-log.txt")) as job_log:
            started = time.perf_counter()
            runner.prepare_input([entry], in_dir, job_log)
            prep_seconds = time.perf_counter() - started
    raw = os.path.join(in_dir, "0.raw")
    size = os.path.getsize(raw)
    copy = os.path.join(scratch, "copy.raw")
    started = time.perf_counter()
    subprocess.run(["cp", raw, copy], check=True)
    copy_seconds = time.perf_counter() - started
    return size, size / prep_seconds / 1e6, size / copy_seconds / 1e6


def main():
    logging.disable(logging.INFO)
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--poll", type=float, default=1.0, help="worker poll interval (s)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-jobs-", dir=os.environ.get("PERF"))
    data_dir = os.path.join(scratch, "data")
    server, endpoint = start_plugin_server()
    try:
        app = make_app(data_dir, args.poll)
        headers, series_uid, plugin_id = setup(app, endpoint)
        client = app.test_client()
        print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT), 'bench/jobs.py', *sys.argv[1:]])}")
        print(f"scratch: {scratch}; {os.cpu_count()} cores; small series: 10 x 320x260 MR; "
              f"remote plug-in on {endpoint}")
        rates = {}
        for concurrency in (1, 4):
            rate, failed, cpu = throughput(app, client, headers, plugin_id, series_uid,
                                           data_dir, args.jobs, args.poll, concurrency, server)
            rates[concurrency] = rate, sum(cpu)
            print(f"throughput, concurrency {concurrency}: {rate:.1f} jobs/s "
                  f"({args.jobs} jobs, {failed} failed; {1000 / rate:.1f} ms wall per job; "
                  f"CPU ms per job: worker {cpu[0]:.1f}, plug-in server {cpu[1]:.1f}, "
                  f"bench {cpu[2]:.1f})")
        # On n cores no concurrency runs jobs faster than n / (CPU per job): concurrency
        # only fills the time a single job leaves the cores idle.
        cores = os.cpu_count()
        ceiling = cores * 1000 / rates[1][1] / rates[1][0]
        print(f"  ratio 4/1: {rates[4][0] / rates[1][0]:.2f}x (goal >= 3x; CPU-bound ceiling "
              f"on {cores} cores = {cores} x wall/CPU at concurrency 1 = {ceiling:.2f}x)")
        capacity = {n: queue_capacity(app, args.jobs, n) for n in (1, 4)}
        print(f"queue alone (claim + finish, no work): {capacity[1]:.0f} jobs/s with 1 "
              f"claimer, {capacity[4]:.0f} jobs/s with 4")
        to_processing, to_finished, worst = latency(app, client, headers, plugin_id, series_uid,
                                                    data_dir, args.samples, args.poll)
        print(f"latency (poll interval {args.poll} s, {args.samples} jobs one at a time): "
              f"median POST->processing {to_processing:.3f} s "
              f"({to_processing / args.poll:.2f}x poll; goal <= 2x; max {worst:.3f} s), "
              f"median POST->finished {to_finished:.3f} s")
        size, prep_rate, copy_rate = input_preparation(app, scratch, args.slices)
        print(f"input preparation, {args.slices}-slice 512x512 CT ({size / 1e6:.0f} MB raw): "
              f"{prep_rate:.0f} MB/s; cp of the same bytes: {copy_rate:.0f} MB/s "
              f"(ratio {prep_rate / copy_rate:.2f})")
    finally:
        server.terminate()
        server.wait()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
