"""The plug-in job source of the worker: claiming jobs into a pool, heartbeats, and failing
the jobs of workers that stopped (API.md 5.2).

Each worker process runs up to PLUGIN_JOB_CONCURRENCY jobs at once. The worker claims them
(so the queue order and the exactly-once claim stay in one place); with a concurrency of 1
the job runs in a thread of the worker, with more each job runs in one of that many job
processes (a job is mostly Python work that holds the GIL: threads of one process would
share one core). While it holds jobs the worker keeps a heartbeat row (SystemState
``plugin_worker:<hash>``) fresh, so that other workers can tell a long job from the job of
a dead worker.

The worker hands the source its app; job processes rebuild it from its settings with the
factory the app names in ``APP_FACTORY`` (this package never imports the app module).
"""
import hashlib
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import threading
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import timedelta

import sqlalchemy as sa

import storage
from models import PluginJob, SystemState, db, iso, parse_iso, utcnow
from plugins import jobs
from plugins.job_log import LOG_NAME, JobLog
from plugins.runner import publish_log, remove_work_dir, run_job
from tasks import HEARTBEAT_SECONDS

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(seconds=120)  # a worker without heartbeat for this long has died
SWEEP_SECONDS = 60
INTERRUPTED = "The job was interrupted because the worker running it stopped."


def _heartbeat_key(worker_id):
    return "plugin_worker:" + hashlib.sha1(worker_id.encode("utf-8")).hexdigest()


def beat(worker_id):
    """Record that ``worker_id`` is alive (a SystemState row per worker)."""
    key, value = _heartbeat_key(worker_id), {"workerId": worker_id, "heartbeatAt": iso(utcnow())}
    with db.engine.begin() as conn:
        updated = conn.execute(sa.update(SystemState).where(SystemState.key == key)
                               .values(value=value)).rowcount
        if not updated:
            conn.execute(sa.insert(SystemState).values(key=key, value=value))


def _heartbeat_at(worker_id):
    with db.engine.connect() as conn:
        value = conn.execute(sa.select(SystemState.value).where(
            SystemState.key == _heartbeat_key(worker_id))).scalar()
    try:
        return parse_iso(value["heartbeatAt"])
    except (TypeError, KeyError, ValueError):
        return None


def _dead_local_worker(worker_id):
    """Whether ``host:pid`` names a process of this host that no longer exists."""
    host, _, pid = worker_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def recover_interrupted_jobs(worker_id, running=()):
    """Fail jobs left ``processing`` by a worker that stopped: this worker's own claims it
    is not running (a restart), workers of this host whose process is gone, and workers
    anywhere whose heartbeat is older than STALE_AFTER. Return the failed job IDs."""
    now = utcnow()
    failed = []
    rows = db.session.execute(db.select(PluginJob.job_id, PluginJob.claimed_by,
                                        PluginJob.started_at).where(
        PluginJob.queue_state == "processing")).all()
    db.session.rollback()
    for job_id, claimed_by, started_at in rows:
        if job_id in running:
            continue
        claimed_by = claimed_by or ""
        if claimed_by == worker_id or _dead_local_worker(claimed_by):
            interrupted = True
        else:
            seen = [d for d in (_heartbeat_at(claimed_by), started_at) if d is not None]
            interrupted = not seen or max(seen) < now - STALE_AFTER
        if interrupted and _interrupted(job_id):
            failed.append(job_id)
            log.warning("Job %s (worker %s) was interrupted; marked failed.", job_id, claimed_by)
    return failed


def _interrupted(job_id):
    """Fail a job whose runner stopped before ending it; return whether it was failed."""
    if not jobs.fail_job(job_id, INTERRUPTED):
        return False
    try:
        with JobLog(os.path.join(storage.results_dir(job_id), LOG_NAME)) as job_log:
            job_log.line(INTERRUPTED)
    except OSError:
        pass
    publish_log(job_id)
    remove_work_dir(storage.work_dir(job_id))
    return True


# --- job processes ----------------------------------------------------------------------------

_JOB_PROCESS = {}  # in a job process: its app
JOB_PROCESS_START_SECONDS = 120
WORKER_WATCH_SECONDS = 1.0


def _app_settings(app):
    """The settings a job process rebuilds the worker's app from (the picklable ones)."""
    settings = {}
    for key, value in app.config.items():
        try:
            pickle.dumps(value)
        except Exception:  # not needed by a job: skipped
            continue
        settings[key] = value
    return settings


def _end_with_worker(worker_pid):
    """End this job process at once when the worker process ends, as the job threads of a
    killed worker would (its jobs are failed by the next worker's recovery sweep)."""
    def watch():
        try:
            with open(os.pidfd_open(worker_pid), "rb", buffering=0) as pidfd:
                select.select([pidfd], [], [])  # readable once the process has ended
        except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
            while True:
                try:
                    os.kill(worker_pid, 0)
                except ProcessLookupError:
                    break
                except OSError:
                    pass
                time.sleep(WORKER_WATCH_SECONDS)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="worker-watch").start()


def _job_process_start(worker_pid, settings):
    """Initializer of a job process: signals are the worker's business (a SIGTERM or ^C
    lets the current jobs finish), then the app is built once from the worker's settings."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _end_with_worker(worker_pid)
    _JOB_PROCESS["app"] = settings["APP_FACTORY"](settings)


def _job_process_ready():
    return os.getpid()


def _job_process_run(job_id):
    with _JOB_PROCESS["app"].app_context():
        try:
            run_job(job_id)
        finally:
            db.session.remove()


def _job_processes(app, size):
    """``size`` job processes, forked from a server that has imported the app once."""
    settings = _app_settings(app)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([settings["APP_FACTORY"].__module__, __name__])
    executor = ProcessPoolExecutor(size, mp_context=context, initializer=_job_process_start,
                                   initargs=(os.getpid(), settings))
    # Started now, and ready before the worker claims a job for them.
    ready = [executor.submit(_job_process_ready) for _ in range(size)]
    for future in ready:
        try:
            future.result(timeout=JOB_PROCESS_START_SECONDS)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
    return executor


class JobPool:
    """The plug-in jobs one worker process runs at once (PLUGIN_JOB_CONCURRENCY): in a
    thread when it is 1, else in as many job processes."""

    def __init__(self, app, worker_id):
        self.app = app
        self.worker_id = worker_id
        self.size = max(1, int(app.config.get("PLUGIN_JOB_CONCURRENCY", 1)))
        self.executor = self._executor()
        self.futures = {}
        self.last_sweep = 0.0
        self._stop_beating = None

    def _executor(self):
        if self.size == 1:
            return ThreadPoolExecutor(1, thread_name_prefix="plugin-job")
        return _job_processes(self.app, self.size)

    def sweep(self, force=False):
        if force or time.monotonic() - self.last_sweep > SWEEP_SECONDS:
            self.last_sweep = time.monotonic()
            recover_interrupted_jobs(self.worker_id, running=set(self.futures.values()))

    def reap(self):
        done = [f for f in self.futures if f.done()]
        for future in done:
            job_id = self.futures.pop(future)
            if future.exception() is not None:  # run_job ends its jobs: its runner died
                log.error("Job %s crashed its runner: %r", job_id, future.exception())
                try:
                    _interrupted(job_id)
                except Exception:  # the sweep fails it later
                    log.exception("Job %s could not be marked failed", job_id)
        if not self.futures:
            self._heartbeats(False)
        return len(done)

    def _run(self, job_id):
        with self.app.app_context():
            try:
                run_job(job_id)
            finally:
                db.session.remove()

    def submit(self, job_id):
        self._heartbeats(True)
        run = self._run if self.size == 1 else _job_process_run
        try:
            future = self.executor.submit(run, job_id)
        except BrokenProcessPool:  # a job process died (its jobs were failed): new ones
            self.executor = self._executor()
            future = self.executor.submit(run, job_id)
        self.futures[future] = job_id

    def _heartbeats(self, on):
        """Keep this worker's heartbeat fresh while it holds jobs."""
        if on and self._stop_beating is None:
            stop = self._stop_beating = threading.Event()
            app, wid = self.app, self.worker_id

            def loop():
                with app.app_context():
                    while not stop.wait(HEARTBEAT_SECONDS):
                        try:
                            beat(wid)
                        except Exception:  # a missed beat is retried
                            log.exception("Heartbeat of %s failed", wid)
            threading.Thread(target=loop, daemon=True, name="plugin-heartbeat").start()
        elif not on and self._stop_beating is not None:
            self._stop_beating.set()
            self._stop_beating = None

    def wait(self, timeout):
        wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)


_POOLS = weakref.WeakKeyDictionary()


def job_pool(app, worker_id):
    """The pool of this app in this process (created on first use, after a recovery sweep)."""
    pool = _POOLS.get(app)
    if pool is None or pool.worker_id != worker_id:
        pool = _POOLS[app] = JobPool(app, worker_id)
        beat(worker_id)
        pool.sweep(force=True)
    return pool


def run_plugin_jobs(app, worker_id):
    """Worker source: fill free job slots from the queue; wait a poll interval for running
    jobs. Returns whether anything was taken, finished or is still running."""
    pool = job_pool(app, worker_id)
    pool.sweep()
    progressed = pool.reap() > 0
    while len(pool.futures) < pool.size:
        job_id = jobs.claim_next_job(worker_id)
        if job_id is None:
            break
        pool.submit(job_id)
        progressed = True
    if progressed:
        return True
    if pool.futures:
        pool.wait(app.config["WORKER_POLL_INTERVAL"])
        return True
    return False
