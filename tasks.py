"""Task rows: create, progress, finish, fail; and the registry of what the worker runs.

A task is created by a request (status ``processing``, unclaimed) and run later by
``flask --app app worker``, which claims it atomically. Progress is written to the task
row through its own short transaction, so the handler's own transaction (e.g. an import
batch) is never committed half-way by a progress report.

A handler is registered with ``@handler("kind")`` and called as ``fn(task, progress)``;
it returns the finish message, or raises ``TaskError`` (its message is shown to the user).
"""
import logging
import time
from datetime import timedelta

import sqlalchemy as sa

from models import Task, db, utcnow

log = logging.getLogger(__name__)

HANDLERS = {}
PROGRESS_INTERVAL = 0.15  # seconds between persisted progress reports (CIRCUS: 150 ms)
STALE_AFTER = timedelta(seconds=120)  # a claimed task without heartbeat for this long died
INTERRUPTED = "The task was interrupted because the worker running it stopped."


class TaskError(Exception):
    """Raised by a handler to end its task with this (user-facing) error message."""


def handler(kind):
    """Decorator: register the worker function for tasks of ``kind``."""
    def register(fn):
        HANDLERS[kind] = fn
        return fn
    return register


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


def claim_next(worker_id):
    """Atomically claim the oldest queued task for this worker; return its id or None.

    The conditional UPDATE makes the claim exactly-once on SQLite and PostgreSQL alike:
    of two workers racing for one row, only one sees ``claimed_by IS NULL``.
    """
    candidate = sa.select(Task.task_id).where(
        Task.status == "processing", Task.claimed_by.is_(None)).order_by(Task.created_at).limit(1)
    if db.engine.dialect.name == "postgresql":
        candidate = candidate.with_for_update(skip_locked=True)
    with db.engine.begin() as conn:
        task_id = conn.execute(candidate).scalar()
        if task_id is None:
            return None
        claimed = conn.execute(sa.update(Task).where(
            Task.task_id == task_id, Task.claimed_by.is_(None)).values(
            claimed_by=worker_id, heartbeat_at=utcnow())).rowcount
    return task_id if claimed == 1 else None


def run_task(task_id):
    """Run one claimed task to its end; every failure ends it with an error message."""
    task = db.session.get(Task, task_id)
    fn = HANDLERS.get(task.kind)
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
