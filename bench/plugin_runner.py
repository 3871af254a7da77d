"""Benchmark of the CAD plug-in runner in a real container engine (issue 18).

Setup as bench/jobs.py (scratch data folder, the shared head-first series, the real
``flask --app app worker`` process), plus a no-op CAD plug-in image built offline
(tests/container_engine.py: busybox + a script writing ``{}`` to results.json) in the
engine of CIRCUS_PLUGIN_DOCKER_COMMAND (else podman or docker), and the remote plug-in
of bench/jobs.py, which also answers at once.

1. One job at a time, idle worker (poll POLL): median wall time startedAt -> finishedAt of a
   no-op CAD job (container start, run, removal) beside a no-op remote job (HTTP), and
   POST -> finished for both.
2. JOBS no-op CAD jobs queued with the manager stopped, then run by the worker at
   PLUGIN_JOB_CONCURRENCY 1, then 4: jobs/s (first startedAt -> last finishedAt) and the
   CPU per job of the worker with its job processes and of the engine's processes.

Usage (from the project root; needs a working engine: ../shared/tools/podman-setup.sh)::

    .venv/bin/python bench/plugin_runner.py
    .venv/bin/python bench/plugin_runner.py --samples 20 --jobs 40 --poll 0.2
"""
import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.jobs import (make_app, post_job, setup, start_plugin_server,  # noqa: E402
                        start_worker, stop, switch, wait_done, wait_ready)
from tests.container_engine import (EngineUnavailable, ImageBuilder,  # noqa: E402
                                    check_engine, containers_of, find_engine)

NO_OP = "#!/bin/sh\necho '{}' > /circus/out/results.json\n"


def register_cad(app, image):
    from models import db
    from plugins import definitions
    from tests.plugin_helpers import cad_definition, grant
    with app.app_context():
        definitions.create_plugin(cad_definition(plugin_id=image, pluginName="No-op CAD"))
        grant("runner@example.com", image)
        db.session.commit()


def one_at_a_time(app, client, headers, plugin_ids, series_uid, data_dir, samples, poll):
    """plugin -> (median run s, median POST->finished s), jobs alternating between them."""
    worker = start_worker(data_dir, poll, 1)
    wait_ready(app, worker)
    runs = {p: [] for p in plugin_ids}
    totals = {p: [] for p in plugin_ids}
    try:
        for _ in range(samples):
            for plugin_id in plugin_ids:
                job_id = post_job(client, headers, plugin_id, series_uid)
                status, created, started, finished = wait_done(app, [job_id])[job_id]
                if status != "finished":
                    raise SystemExit(f"Job {job_id} of {plugin_id[:12]} ended {status}.")
                runs[plugin_id].append((finished - started).total_seconds())
                totals[plugin_id].append((finished - created).total_seconds())
    finally:
        stop(worker)
    return {p: (statistics.median(runs[p]), statistics.median(totals[p])) for p in plugin_ids}


def batch(app, client, headers, plugin_id, series_uid, data_dir, jobs, poll, concurrency):
    """(jobs/s, failed) of ``jobs`` CAD jobs queued first, then run at ``concurrency``."""
    switch(app, "stopped")
    ids = [post_job(client, headers, plugin_id, series_uid) for _ in range(jobs)]
    worker = start_worker(data_dir, poll, concurrency)
    wait_ready(app, worker)
    switch(app, "running")
    try:
        rows = wait_done(app, ids)
    finally:
        stop(worker)
    failed = sum(1 for r in rows.values() if r[0] != "finished")
    first = min(r[2] for r in rows.values())
    last = max(r[3] for r in rows.values() if r[3] is not None)
    return jobs / (last - first).total_seconds(), failed


def main():
    logging.disable(logging.INFO)
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="jobs one at a time, each")
    parser.add_argument("--jobs", type=int, default=40, help="jobs per batch")
    parser.add_argument("--poll", type=float, default=0.2, help="worker poll interval (s)")
    args = parser.parse_args()
    try:
        builder = ImageBuilder(find_engine())
        check_engine(builder)
    except EngineUnavailable as exc:
        raise SystemExit(str(exc)) from None
    os.environ["CIRCUS_PLUGIN_DOCKER_COMMAND"] = builder.engine  # for the worker process
    scratch = tempfile.mkdtemp(prefix="bench-plugin-runner-", dir=os.environ.get("PERF"))
    data_dir = os.path.join(scratch, "data")
    server, endpoint = start_plugin_server()
    try:
        image = builder.build({"/plugin/run.sh": NO_OP}, ["/plugin/run.sh"])
        app = make_app(data_dir, args.poll)
        headers, series_uid, remote_id = setup(app, endpoint)
        register_cad(app, image)
        client = app.test_client()
        print(f"command: {' '.join(['.venv/bin/python', 'bench/plugin_runner.py', *sys.argv[1:]])}")
        print(f"scratch: {scratch}; {os.cpu_count()} cores; engine: {builder.engine}; "
              f"small series: 10 x 320x260 MR; remote plug-in on {endpoint}")
        medians = one_at_a_time(app, client, headers, [image, remote_id], series_uid,
                                data_dir, args.samples, args.poll)
        for label, plugin_id in (("CAD (container)", image), ("remote (HTTP)", remote_id)):
            run, total = medians[plugin_id]
            print(f"one job at a time, {label}: median run {run:.3f} s, "
                  f"POST->finished {total:.3f} s ({args.samples} jobs, poll {args.poll} s)")
        print(f"  container overhead per job: {medians[image][0] - medians[remote_id][0]:.3f} s")
        rates = {}
        for concurrency in (1, 4):
            rate, failed = batch(app, client, headers, image, series_uid, data_dir, args.jobs,
                                 args.poll, concurrency)
            rates[concurrency] = rate
            print(f"CAD batch, concurrency {concurrency}: {rate:.2f} jobs/s "
                  f"({args.jobs} jobs, {failed} failed; {1 / rate:.3f} s wall per job)")
        print(f"  ratio 4/1: {rates[4] / rates[1]:.2f}x on {os.cpu_count()} cores")
        left = containers_of(builder.engine)
        print(f"job containers on the engine after the runs (any CIRCUS run): {len(left)}" + (f" ({', '.join(left)})" if left else ""))
    finally:
        server.terminate()
        server.wait()
        builder.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
