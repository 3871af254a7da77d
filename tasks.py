"""Task rows: create, claim, progress, finish, fail; and the exactly-once claim of queued
rows that tasks and plug-in jobs share.

A task is created by a request (status ``processing``, unclaimed) and run later by
``flask --app app worker``, which claims it atomically. Progress is written to the task
row through its own short transaction, so the handler's own transaction (e.g. an import
batch) is never committed half-way by a progress report.

A handler (listed by kind in ``worker.TASK_HANDLERS``) is called as ``fn(task, progress)``;
it returns the finish message, or raises ``TaskError`` (its message is shown to the user).
"""
import json
import logging
import mimetypes
import os
import threading
import time
from datetime import timedelta

import sqlalchemy as sa

import storage
from models import Task, db, utcnow
from search import SearchSpec

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.15  # seconds between persisted progress reports (CIRCUS: 150 ms)
HEARTBEAT_SECONDS = 15  # how often running work (a task, a worker's plug-in jobs) says it lives
STALE_AFTER = timedelta(seconds=120)  # a claimed task without heartbeat for this long died
INTERRUPTED = "The task was interrupted because the worker running it stopped."
# Set by the worker when told twice to stop: running handlers give up at their next report.
ABORT = threading.Event()
_FILTER_FIELDS = {"taskId": Task.task_id, "status": Task.status, "dismissed": Task.dismissed}
SEARCH = SearchSpec(  # GET /api/tasks: the caller's tasks
    fields=_FILTER_FIELDS, serialize=Task.to_json, default_sort={"createdAt": -1},
    sort_fields={**_FILTER_FIELDS, "name": Task.name, "createdAt": Task.created_at,
                 "updatedAt": Task.updated_at, "endedAt": Task.ended_at},
    parse_error="Filter string could not be parsed.")


class TaskError(Exception):
    """Raised by a handler to end its task with this (user-facing) error message."""


def create_task(user_email, name, kind, params=None, download_file_type=None):
    """Add a queued task to the session (the caller commits) and return it."""
    task = Task(user_email=user_email, name=name, kind=kind, params=params or {},
                download_file_type=download_file_type, status="processing",
                message="Starting the task.")
    db.session.add(task)
    return task


def _update(task_id, **values):
    """Write task fields in a transaction of their own."""
    with db.engine.begin() as conn:
        conn.execute(sa.update(Task).where(Task.task_id == task_id).values(**values))


class Progress:
    """Progress reporter handed to handlers; persists at most once per PROGRESS_INTERVAL."""

    def __init__(self, task_id):
        self.task_id = task_id
        self._last = 0.0
        self._pending = None

    def __call__(self, message, finished=None, total=None, force=False):
        if ABORT.is_set():
            raise TaskError(INTERRUPTED)
        self._pending = {"message": message, "finished": finished, "total": total}
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self.flush()

    def flush(self):
        if self._pending is not None:
            _update(self.task_id, heartbeat_at=utcnow(), **self._pending)
            self._pending = None
            self._last = time.monotonic()


def finish(task_id, message=None):
    """Mark a task finished with its message (``Finished.`` when none is given)."""
    _update(task_id, status="finished", finished_message=message or "Finished.",
            message=message or "Finished.", ended_at=utcnow(), heartbeat_at=utcnow())


def fail(task_id, message):
    """Mark a task failed with a user-facing message."""
    _update(task_id, status="error", error_message=message, message=message,
            ended_at=utcnow(), heartbeat_at=utcnow())


def claim_first(candidate, claim):
    """Take the first row of ``candidate``; return its key, or None when there is none or
    another worker took it first.

    The claim reads the candidate row and, in the same transaction, takes it with a
    conditional UPDATE that only matches while the row is still unclaimed: of any number of
    workers racing for one row, exactly one sees its UPDATE change the row. On PostgreSQL
    the candidate is read FOR UPDATE SKIP LOCKED, so racing workers pass over a row being
    taken instead of waiting for it. Tasks and plug-in jobs (``plugins.jobs``) claim with it.

    Parameters
    ----------
    candidate : sqlalchemy.Select
        One key column, ordered and limited to one row: the row to try.
    claim : callable
        ``key -> sqlalchemy.Update`` that takes the row only while it is still unclaimed.
    """
    if db.engine.dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    with db.engine.begin() as conn:
        key = conn.execute(candidate).scalar()
        if key is None:
            return None
        claimed = conn.execute(claim(key)).rowcount
    return key if claimed == 1 else None


def claim_next(worker_id):
    """Atomically claim the oldest queued task for this worker; return its id or None.

    The conditional UPDATE makes the claim exactly-once on SQLite and PostgreSQL alike:
    of two workers racing for one row, only one sees ``claimed_by IS NULL``.
    """
    candidate = sa.select(Task.task_id).where(
        Task.status == "processing", Task.claimed_by.is_(None)).order_by(Task.created_at).limit(1)
    return claim_first(candidate, lambda task_id: sa.update(Task).where(
        Task.task_id == task_id, Task.claimed_by.is_(None)).values(
        claimed_by=worker_id, heartbeat_at=utcnow()))


def run_task(task_id, handlers):
    """Run one claimed task to its end with ``handlers[task.kind]``; every failure (an
    unknown kind too) ends it with an error message."""
    task = db.session.get(Task, task_id)
    fn = handlers.get(task.kind)
    progress = Progress(task_id)
    try:
        if fn is None:
            raise TaskError(f"Unknown task kind {task.kind}.")
        message = fn(task, progress)
        progress.flush()
        db.session.commit()
        finish(task_id, message)
    except TaskError as exc:
        db.session.rollback()
        fail(task_id, str(exc))
    except Exception:
        log.exception("Task %s (%s) failed", task_id, task.kind)
        db.session.rollback()
        fail(task_id, "An internal error occurred while processing the task.")
    finally:
        db.session.remove()


def fail_interrupted():
    """Fail claimed tasks whose worker stopped sending heartbeats (a crash or restart)."""
    stale = utcnow() - STALE_AFTER
    condition = sa.and_(Task.status == "processing", Task.claimed_by.is_not(None),
                        sa.or_(Task.heartbeat_at.is_(None), Task.heartbeat_at < stale))
    with db.engine.begin() as conn:
        # A read first: the list endpoint calls this on every request, and a write
        # (a lock on SQLite) is only needed when a zombie actually exists.
        if conn.execute(sa.select(Task.task_id).where(condition).limit(1)).first() is None:
            return 0
        return conn.execute(sa.update(Task).where(condition).values(
            status="error", error_message=INTERRUPTED, message=INTERRUPTED,
            ended_at=utcnow())).rowcount


def fail_claimed_by(worker_id):
    """Fail the tasks a given worker had claimed (called when that worker starts again)."""
    with db.engine.begin() as conn:
        conn.execute(sa.update(Task).where(
            Task.status == "processing", Task.claimed_by == worker_id).values(
            status="error", error_message=INTERRUPTED, message=INTERRUPTED, ended_at=utcnow()))


# --- the progress report (GET /api/tasks/report) ---------------------------------------------

REPORT_KEEPALIVE_SECONDS = 10
REPORT_OVERLAP = timedelta(seconds=2)  # re-read window: commits land after their timestamps


def _event(kind, task_id, message, finished=None, total=None):
    """One SSE event; JSON keys in CIRCUS's order, unknown counts omitted."""
    data = {"taskId": task_id, "message": message}
    if finished is not None:
        data["finished"] = finished
    if total is not None:
        data["total"] = total
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def report_stream(engine, user_email, poll_interval, keepalive=REPORT_KEEPALIVE_SECONDS,
                  clock=time.monotonic, sleep=time.sleep):
    """Yield the Server-Sent Events of one user's tasks, forever (API.md 3.9).

    The first chunk is ``"\n"`` plus a progress event per running task; then one chunk
    per poll: its events, the ``":\n"`` keep-alive, or ``""`` when there is nothing to send.

    The worker is another process, so the stream polls the tasks table: one query per
    poll, for the user's tasks created since the oldest task that can still change
    (index ``ix_tasks_user_created``) and updated since the last poll. An event is sent
    when a task's state differs from what this stream last sent for it.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Used without the Flask app context (the generator outlives the request).
    """
    columns = (Task.task_id, Task.status, Task.message, Task.finished, Task.total,
               Task.finished_message, Task.error_message, Task.created_at, Task.updated_at,
               Task.ended_at)
    started = utcnow()
    with engine.connect() as conn:
        running = conn.execute(sa.select(*columns).where(
            Task.user_email == user_email, Task.status == "processing")
            .order_by(Task.created_at)).all()
    # A task created just before ``started`` may commit after the query above.
    since = min([row.created_at for row in running] + [started - REPORT_OVERLAP])
    watermark = max([row.updated_at for row in running] + [started])
    sent = {}
    first = ["\n"]  # the first byte makes the stream live
    for row in running:
        sent[row.task_id] = (row.status, row.message, row.finished, row.total)
        first.append(_event("progress", row.task_id, row.message or "Starting the task.",
                            row.finished, row.total))
    yield "".join(first)
    last_write = clock()
    while True:
        sleep(poll_interval)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(*columns).where(
                Task.user_email == user_email, Task.created_at >= since,
                Task.updated_at > watermark - REPORT_OVERLAP)
                .order_by(Task.updated_at)).all()
        chunks = []
        for row in rows:
            watermark = max(watermark, row.updated_at)
            state = (row.status, row.message, row.finished, row.total)
            if sent.get(row.task_id) == state:
                continue
            seen_running = row.task_id in sent
            sent[row.task_id] = state
            if row.status == "processing":
                chunks.append(_event("progress", row.task_id, row.message or "Starting the task.",
                                     row.finished, row.total))
            elif seen_running or (row.ended_at is not None and row.ended_at >= started):
                if row.status == "finished":
                    chunks.append(_event("finish", row.task_id, row.finished_message or "Finished."))
                else:
                    chunks.append(_event("error", row.task_id, row.error_message or row.message
                                         or "An error occurred."))
        if chunks:
            last_write = clock()
            yield "".join(chunks)
        elif clock() - last_write >= keepalive:
            last_write = clock()
            yield ":\n"
        else:
            yield ""  # nothing new: lets the caller step the stream (the view drops it)


# --- downloads ---------------------------------------------------------------------------------

class DownloadGone(Exception):
    """Raised when a finished task's download file no longer exists."""


def download_extension(mime_type):
    """``tar.gz`` for tgz, else the usual extension of the MIME type (``bin`` by default)."""
    if mime_type == "application/x-tgz":
        return "tar.gz"
    known = {"application/zip": "zip", "application/octet-stream": "bin",
             "application/json": "json", "text/plain": "txt"}
    if mime_type in known:
        return known[mime_type]
    guessed = mimetypes.guess_extension(mime_type or "")
    return guessed.lstrip(".") if guessed else "bin"


def open_download(task):
    """(open binary file, size) of a task's download; DownloadGone when deleted."""
    try:
        fh = open(storage.download_path(task.task_id), "rb")
    except FileNotFoundError:
        raise DownloadGone(task.task_id) from None
    return fh, os.fstat(fh.fileno()).st_size


def remove_download(task_id):
    """Delete a task's download file (missing is fine)."""
    try:
        os.unlink(storage.download_path(task_id))
    except OSError:
        pass


def dismiss(task, dismissed):
    """Set ``dismissed``; dismissing deletes the download file (errors ignored)."""
    task.dismissed = dismissed
    db.session.commit()
    if dismissed and task.download_file_type:
        remove_download(task.task_id)


def sweep_downloads(retention_seconds, temp_grace_seconds=3600):
    """Delete downloads older than the retention, and temporary files of dead writers.

    A temporary file is written continuously while its export runs, so one untouched
    for ``temp_grace_seconds`` belongs to a crashed worker. Returns the number deleted.
    """
    folder = storage.root("downloads")
    now = time.time()
    removed = 0
    for entry in os.scandir(folder):
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            limit = temp_grace_seconds if entry.name.startswith(".tmp-") else retention_seconds
            if entry.stat(follow_symlinks=False).st_mtime < now - limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("Swept %d old download file(s).", removed)
    return removed
