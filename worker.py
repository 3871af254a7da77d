"""The worker (`flask --app app worker`): claims queued work from the database and runs it.

Work comes from *sources*: functions ``fn(worker_id) -> bool`` that claim one unit of work
atomically, run it, and say whether they did anything. Tasks are one source; plug-in jobs
another. Several workers (on several hosts) can run at once: every claim is exactly-once.
SIGTERM stops the loop after the current unit of work.
"""
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager

import sqlalchemy as sa

import tasks
from models import Task, db, utcnow

log = logging.getLogger(__name__)

SOURCES = []
HEARTBEAT_SECONDS = 15
DOWNLOAD_SWEEP_SECONDS = 3600  # how often old task downloads are looked for


def source(fn):
    """Decorator: register a source of work."""
    SOURCES.append(fn)
    return fn


def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def heartbeat(app, task_id):
    """Keep a claimed task's heartbeat fresh while it runs, so no one thinks it died."""
    stop = threading.Event()

    def beat():
        with app.app_context():
            while not stop.wait(HEARTBEAT_SECONDS):
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


@source
def run_one_task(wid):
    """Claim and run the oldest queued task."""
    from flask import current_app
    task_id = tasks.claim_next(wid)
    if task_id is None:
        return False
    with heartbeat(current_app._get_current_object(), task_id):
        tasks.run_task(task_id)
    return True


def run_pending(wid="inline", max_units=10000):
    """Run queued work until none is left (what tests and one-shot runs use)."""
    _load_handlers()
    done = 0
    while done < max_units and any(src(wid) for src in list(SOURCES)):
        done += 1
    return done


def _load_handlers():
    """Import the modules whose handlers and sources register themselves on import."""
    import dicom_import  # noqa: F401  (series_import)
    import exports  # noqa: F401  (export-mhd, export-cs-volume)
    from plugins import job_source  # noqa: F401  (run_plugin_jobs)


def run_forever(app, poll_interval=None):
    """The worker loop; returns after SIGTERM or SIGINT once the current work is done."""
    _load_handlers()
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
    last_sweep = last_download_sweep = float("-inf")  # both run once at start
    while not stopping.is_set():
        if time.monotonic() - last_sweep > 60:
            tasks.fail_interrupted()
            last_sweep = time.monotonic()
        if time.monotonic() - last_download_sweep > DOWNLOAD_SWEEP_SECONDS:
            try:
                tasks.sweep_downloads(app.config["DOWNLOAD_RETENTION_SECONDS"])
            except OSError:
                log.exception("Sweeping old downloads failed")
            last_download_sweep = time.monotonic()
        did_work = False
        for src in list(SOURCES):
            if stopping.is_set():
                break
            try:
                did_work = src(wid) or did_work
            except Exception:
                log.exception("Worker source %s failed", src.__name__)
                db.session.rollback()
        if not did_work:
            stopping.wait(interval)
    log.info("Worker %s stopped.", wid)
