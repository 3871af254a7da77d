"""The worker (`flask --app app worker`): claims queued work from the database and runs it.

Work comes from *sources* (``JOB_SOURCES``): functions ``fn(app, worker_id) -> bool`` that
claim one unit of work atomically, run it, and say whether they did anything. Tasks are one
source, run by kind with ``TASK_HANDLERS``; plug-in jobs another. Both tables are here, so
what the worker runs is read in one place. Several workers (on several hosts) can run at
once: every claim is exactly-once. SIGTERM stops the loop after the current unit of work.
"""
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import sqlalchemy as sa
from flask import current_app

from dicom import batch, importer
import audit
import exports
import tasks
from models import Task, db, utcnow
from plugins import job_source

log = logging.getLogger(__name__)

DOWNLOAD_SWEEP_SECONDS = 3600  # how often old task downloads are looked for
ORPHAN_SWEEP_SECONDS = 6 * 3600  # how often stored files without a row are looked for
AUDIT_PRUNE_SECONDS = 3600  # how often audit records beyond the retention are pruned


def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def heartbeat(app, task_id):
    """Keep a claimed task's heartbeat fresh while it runs, so no one thinks it died."""
    stop = threading.Event()

    def beat():
        with app.app_context():
            while not stop.wait(app.config.get("TASK_HEARTBEAT_SECONDS")
                                or tasks.HEARTBEAT_SECONDS):
                with db.engine.begin() as conn:
                    conn.execute(sa.update(Task).where(Task.task_id == task_id)
                                 .values(heartbeat_at=utcnow()))
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# Task kind (``Task.kind``, set where the task is created) -> ``fn(task, progress)``.
TASK_HANDLERS = {
    "series_import": importer.run_import_task,
    "export-cs-volume": exports.run_cs_volume_export,
    "export-mhd": exports.run_mhd_export,
}


def run_one_task(app, wid):
    """Claim and run the oldest queued task."""
    task_id = tasks.claim_next(wid)
    if task_id is None:
        return False
    with heartbeat(app, task_id):
        tasks.run_task(task_id, TASK_HANDLERS)
    return True


# Asked in this order on every round of the loop.
JOB_SOURCES = [run_one_task, job_source.run_plugin_jobs]


def run_pending(wid="inline", max_units=10000):
    """Run queued work until none is left (what tests and one-shot runs use); needs an app
    context."""
    app = current_app._get_current_object()
    done = 0
    while done < max_units and any(src(app, wid) for src in JOB_SOURCES):
        done += 1
    return done


def run_forever(app, poll_interval=None):
    """The worker loop; returns after SIGTERM or SIGINT once the current work is done."""
    stopping = threading.Event()

    def stop(signum, _frame):
        if stopping.is_set():  # a second signal: give up the current task at its next step
            log.info("Signal %s received again: interrupting the current task.", signum)
            tasks.ABORT.set()
            return
        log.info("Signal %s received: stopping after the current work.", signum)
        stopping.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    wid = worker_id()
    interval = poll_interval or app.config["WORKER_POLL_INTERVAL"]
    log.info("Worker %s started.", wid)
    tasks.fail_claimed_by(wid)
    # Housekeeping: (seconds between runs, what, its description); each runs once at start.
    chores = [
        (min(60, app.config["TASK_STALE_SECONDS"] / 2), tasks.fail_interrupted,
         "Failing interrupted tasks"),
        (DOWNLOAD_SWEEP_SECONDS,
         lambda: tasks.sweep_downloads(app.config["DOWNLOAD_RETENTION_SECONDS"]),
         "Sweeping old downloads"),
        (ORPHAN_SWEEP_SECONDS, lambda: batch.sweep_orphans(app.config["ORPHAN_GRACE_SECONDS"]),
         "Sweeping stored files without a row"),
        (ORPHAN_SWEEP_SECONDS, lambda: importer.sweep_spools(app.config["ORPHAN_GRACE_SECONDS"]),
         "Sweeping the stored files of ended uploads"),
        (AUDIT_PRUNE_SECONDS, lambda: audit.prune(app.config["AUDIT_RETENTION_DAYS"]),
         "Pruning the audit trail"),
    ]
    last_run = [float("-inf")] * len(chores)
    while not stopping.is_set():
        for index, (every, chore, what) in enumerate(chores):
            if time.monotonic() - last_run[index] > every:
                try:
                    chore()
                except Exception:
                    log.exception("%s failed", what)
                    db.session.rollback()
                last_run[index] = time.monotonic()
        did_work = False
        for src in JOB_SOURCES:
            if stopping.is_set():
                break
            try:
                did_work = src(app, wid) or did_work
            except Exception:
                log.exception("Worker source %s failed", src.__name__)
                db.session.rollback()
        if not did_work:
            stopping.wait(interval)
    log.info("Worker %s stopped.", wid)
