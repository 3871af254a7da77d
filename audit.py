"""The audit trail: an append-only, hash-chained record of who did what to which data.

``record(action, target_type, target_id, ...)`` is the one call every feature makes (views,
the image server, later WADO and DICOM C-GET/C-MOVE). It only queues the record on the
session: the record is written by the next commit of that session, in the same transaction
as the action it describes, so an acknowledged action is never missing from the trail and a
rolled-back one leaves a record only when it is re-committed as a failure (below).

The chain: record *n* holds ``prev_hash`` (record *n-1*'s hash) and ``hash`` =
SHA-256(prev_hash, its own fields). ``audit_head`` is one row holding the last sequence
number and hash. A commit with queued records locks that row (one UPDATE), numbers and
hashes its records, writes them and commits: the row is held only while that commit runs,
never for the rest of the request, so concurrent readers serialise only on a few short
statements.

In a request, ``install``'s after_request hook commits records still queued when the answer
is ready (read views commit nothing else). An answer of 400 or more first rolls back what
the view left unfinished and then commits the queued records as ``failure``. Outside a
request (CLI, worker, the volume WebSocket) the caller commits.

Actions are plain names a person filters on: ``login``, ``login-failed``,
``login-throttled``, ``token-create``, ``token-delete``, ``series-view``, ``series-search``,
``series-delete``, ``case-view``, ``case-search``, ``case-delete``, ``export``,
``download``, ``rs-volume``, ``admin-post``/``-put``/``-patch``/``-delete``, ``audit-prune``;
``wado``, ``dicom-get``, ``dicom-move`` for the features that will call ``record`` next.
"""
import hashlib
import json
import logging
import sqlite3
import threading
import time
import weakref
from datetime import timedelta

import orjson

from flask import current_app, g, has_request_context, request
from sqlalchemy import event
from sqlalchemy.orm import Session

from models import AuditEvent, AuditHead, db, iso, utcnow

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # prev_hash of the first record ever
HEAD_ID = 1
PRUNED = "audit-pruned"  # action of the marker that replaces pruned records
_PENDING = "circus.audit_pending"
_FIELDS = ("seq", "at", "user_email", "token_id", "client", "action", "target_type",
           "target_id", "outcome", "status", "detail")


def enabled():
    return bool(current_app.config.get("AUDIT_ENABLED", True))


def record(action, target_type=None, target_id=None, outcome="success", detail=None,
           user_email=None, session=None):
    """Queue one audit record; the next commit of ``session`` writes it.

    Parameters
    ----------
    action : str
        A plain name (``login``, ``series-view``, ``wado``, ``dicom-move``...).
    target_type, target_id : str, optional
        What was acted on: ``series``/UID, ``case``/ID, ``task``, ``user``, ``token``...
    outcome : str
        ``success``, ``failure`` or ``denied``.
    detail : dict, optional
        Anything else worth keeping (e.g. the series UIDs a search showed); never secrets.
    user_email : str, optional
        Defaults to the request's authenticated user.
    """
    if not enabled():
        return
    entry = {"at": utcnow(), "user_email": user_email, "token_id": None, "client": None,
             "action": action, "target_type": target_type,
             "target_id": None if target_id is None else str(target_id)[:255],
             "outcome": outcome, "status": None,
             "detail": None if detail is None else _canonical(detail)}
    if has_request_context():
        user = g.get("user")
        if user_email is None and user is not None:
            entry["user_email"] = user.user_email
        entry["token_id"] = g.get("token_id")
        entry["client"] = (request.remote_addr or "")[:64] or None
    (session or db.session).info.setdefault(_PENDING, []).append(entry)


def _canonical(detail):
    """Compact JSON with sorted keys: the text stored and hashed."""
    return orjson.dumps(detail, option=orjson.OPT_SORT_KEYS, default=str).decode()


def has_pending(session=None):
    return bool((session or db.session).info.get(_PENDING))


def record_hash(prev_hash, entry):
    """The hash of a record: SHA-256 over its predecessor's hash and its own fields."""
    return _hash_values(prev_hash, [entry[name] for name in _FIELDS])


def _hash_values(prev_hash, values):
    """``record_hash`` of the fields in ``_FIELDS`` order."""
    values = [prev_hash, *values]
    values[2] = values[2].isoformat(timespec="microseconds")  # "at"
    return hashlib.sha256(orjson.dumps(values)).hexdigest()


# The chain's statements, the project's one place of raw SQL: they run on every audited
# request, and SQLAlchemy's execution path around each costs several times the statement
# on SQLite (measured). Both drivers take named parameters, in their own style.
_SQL = {
    "advance": "UPDATE audit_head SET seq = seq + {count} WHERE id = 1 RETURNING seq, hash",
    "advance_if": ("UPDATE audit_head SET seq = {new_seq}, hash = {new_hash} "
                   "WHERE id = 1 AND seq = {expected}"),
    "set_hash": "UPDATE audit_head SET hash = {new_hash} WHERE id = 1",
    "create_head": ("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, {genesis}) "
                    "ON CONFLICT DO NOTHING"),
    "insert": ("INSERT INTO audit_events (seq, at, user_email, token_id, client, action, "
               "target_type, target_id, outcome, status, detail, prev_hash, hash) VALUES "
               "({seq}, {at}, {user_email}, {token_id}, {client}, {action}, {target_type}, "
               "{target_id}, {outcome}, {status}, {detail}, {prev_hash}, {hash})"),
}
_STYLES = {"qmark": ":{}", "named": ":{}", "pyformat": "%({})s", "format": "%({})s"}
_compiled = {}  # paramstyle -> {name: SQL}
# engine -> (seq, hash) after this process's last audited commit on it
_last_head = weakref.WeakKeyDictionary()
_NEW_HEAD = "circus.audit_new_head"
# SQLite: the threads of a process take turns here rather than in SQLite's busy handler,
# which sleeps a millisecond or more on every collision; held from the first statement of
# the chain to the end of the commit (the span SQLite holds its write lock anyway).
_WRITING = threading.Lock()
_HOLDS = "circus.audit_holds_lock"
LOCK_TIMEOUT = 30  # seconds; then the commit fails instead of waiting forever
BUSY_NAPS = (0.00005, 0.0001, 0.0001, 0.0002, 0.0002, 0.0005, 0.0005, 0.001, 0.001, 0.002)
SQLITE_BUSY_TIMEOUT_MS = 30000  # app.py's busy_timeout, restored after the naps


class _Names(dict):
    def __init__(self, style):
        super().__init__()
        self.style = style

    def __missing__(self, key):
        return self.style.format(key)


def _statements(dialect):
    style = "named" if dialect.paramstyle == "qmark" else dialect.paramstyle
    if style not in _compiled:
        names = _Names(_STYLES[style])
        _compiled[style] = {key: sql.format_map(names) for key, sql in _SQL.items()}
    return _compiled[style]


def _first_write(cursor, statement, params, sqlite):
    """Execute the chain's first statement, which takes SQLite's write lock. Another process
    holding it is waited for in short naps: SQLite's own busy handler sleeps a millisecond
    and more per try, while the lock is held for a fraction of that."""
    if not sqlite:
        cursor.execute(statement, params)
        return
    pragmas = cursor.connection.cursor()  # not ``cursor``: its RETURNING row is still to read
    pragmas.execute("PRAGMA busy_timeout = 0")
    try:
        for nap in BUSY_NAPS:
            try:
                cursor.execute(statement, params)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
            time.sleep(nap)
    finally:
        pragmas.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        pragmas.close()
    cursor.execute(statement, params)  # the last try waits as long as any other statement


def _advance_head(cursor, sql, count, sqlite=False, first=True):
    """Lock the head row and reserve ``count`` numbers: (last seq before, its hash)."""
    if first:
        _first_write(cursor, sql["advance"], {"count": count}, sqlite)
    else:
        cursor.execute(sql["advance"], {"count": count})
    row = cursor.fetchone()
    if row is None:  # a database created without the migration's head row (create_all)
        cursor.execute(sql["create_head"], {"genesis": GENESIS})
        cursor.execute(sql["advance"], {"count": count})
        row = cursor.fetchone()
    return row[0] - count, row[1]


@event.listens_for(Session, "before_commit")
def _append_pending(session):
    """Write the session's queued records at the end of the chain, in its transaction.

    With the head this process committed last, one conditional UPDATE locks and moves it
    (no other writer came in between); else the head is locked and read, then moved.
    """
    pending = session.info.get(_PENDING)
    if not pending:
        return
    if session.new or session.dirty or session.deleted:
        session.flush()  # the action's own writes first: the head is locked after them
    connection = session.connection()
    sql = _statements(connection.dialect)
    sqlite = connection.dialect.name == "sqlite"
    if sqlite and not session.info.get(_HOLDS):
        if not _WRITING.acquire(timeout=LOCK_TIMEOUT):
            raise RuntimeError("the audit trail is busy")
        session.info[_HOLDS] = True
    key = connection.engine
    cursor = connection.connection.dbapi_connection.cursor()
    ok = False
    try:
        rows = None
        if key in _last_head:
            seq, prev = _last_head[key]
            rows = _chained(pending, seq, prev)
            _first_write(cursor, sql["advance_if"], {
                "expected": seq, "new_seq": rows[-1]["seq"], "new_hash": rows[-1]["hash"]},
                sqlite)
            if cursor.rowcount != 1:
                rows = None  # another process wrote in between
        if rows is None:
            seq, prev = _advance_head(cursor, sql, len(pending), sqlite, first=key not in _last_head)
            rows = _chained(pending, seq, prev)
            cursor.execute(sql["set_hash"], {"new_hash": rows[-1]["hash"]})
        for row in rows:
            cursor.execute(sql["insert"], {**row, "at": _stored_at(row["at"], sqlite)})
        ok = True
    finally:
        cursor.close()
        if not ok:
            _release(session)
    session.info[_NEW_HEAD] = (key, rows[-1]["seq"], rows[-1]["hash"])


def _stored_at(at, sqlite):
    """A datetime as SQLAlchemy's DateTime stores it on SQLite (always with microseconds)."""
    return at.isoformat(" ", "microseconds") if sqlite else at


def _chained(pending, seq, prev):
    """The rows of the queued records numbered and hashed after (seq, prev)."""
    rows = []
    for entry in pending:
        seq += 1
        row = {**entry, "seq": seq, "prev_hash": prev}
        row["hash"] = prev = record_hash(prev, row)
        rows.append(row)
    return rows


@event.listens_for(Session, "after_commit")
def _clear_pending(session):
    _release(session)
    session.info.pop(_PENDING, None)
    head = session.info.pop(_NEW_HEAD, None)
    if head is not None:
        _last_head[head[0]] = head[1:]


@event.listens_for(Session, "after_rollback")
def _forget_new_head(session):
    _release(session)
    session.info.pop(_NEW_HEAD, None)


def _release(session):
    if session.info.pop(_HOLDS, False):
        _WRITING.release()


def _commit_with_answer(response):
    """after_request: commit the records still queued, as failures if the answer is one."""
    pending = db.session.info.get(_PENDING)
    if not pending:
        return response
    if response.status_code >= 400:
        db.session.rollback()  # whatever the failed view left half done is not committed
        for entry in pending:
            entry["status"] = response.status_code
            if entry["outcome"] == "success":
                entry["outcome"] = "failure"
    else:
        for entry in pending:
            entry["status"] = response.status_code
    try:
        db.session.commit()
    except Exception:
        # the answer was not sent yet: refuse it rather than give data without a record
        log.exception("Audit records could not be committed")
        db.session.rollback()
        db.session.info.pop(_PENDING, None)
        response = current_app.response_class(
            json.dumps({"error": "Internal server error."}), status=500,
            mimetype="application/json")
    return response


def install(app):
    """Commit queued records with each answer (see the module docstring)."""
    app.after_request(_commit_with_answer)


def admin_change():
    """before_request of /api/admin: every change made there is recorded."""
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        record("admin-" + request.method.lower(), "admin", request.path)


# --- reading, verifying, exporting, pruning ----------------------------------------------

def to_json(row):
    """An audit record on the wire (camelCase, as every document)."""
    return {"seq": row.seq, "at": iso(row.at), "userEmail": row.user_email,
            "tokenId": row.token_id, "client": row.client, "action": row.action,
            "targetType": row.target_type, "targetId": row.target_id,
            "outcome": row.outcome, "status": row.status,
            "detail": None if row.detail is None else json.loads(row.detail),
            "prevHash": row.prev_hash, "hash": row.hash}


def verify(batch=5000, progress=None):
    """Walk the chain in order; return (records checked, None) or (n, first bad seq, why).

    A leading ``audit-pruned`` marker is the chain's anchor: its own hash is the kept hash
    of the last pruned record, so it is taken as given (pruning itself is recorded in the
    chain by an ``audit-prune`` record).
    """
    columns = [getattr(AuditEvent, name) for name in (*_FIELDS, "prev_hash", "hash")]
    width = len(_FIELDS)  # plain tuples: a third of the time of mappings over a million rows
    seq_at, action_at, target_at = (_FIELDS.index(name) for name in ("seq", "action",
                                                                       "target_id"))
    head = db.session.get(AuditHead, HEAD_ID)
    connection = db.session.connection()
    prev, expected_seq, checked, last = None, None, 0, 0
    marker, prunes = None, set()
    while True:
        rows = connection.execute(db.select(*columns).where(AuditEvent.seq > last)
                                  .order_by(AuditEvent.seq).limit(batch)).all()
        if not rows:
            break
        for row in rows:
            seq, row_prev, row_hash = row[seq_at], row[width], row[width + 1]
            if prev is None and row[action_at] == PRUNED:
                prev, expected_seq, marker = row_hash, seq + 1, seq
                checked += 1
                continue
            if prev is None:
                prev, expected_seq = GENESIS, 1
            if seq != expected_seq:
                return checked, expected_seq, f"record {expected_seq} is missing"
            if row_prev != prev:
                return checked, seq, "its prevHash does not match the record before it"
            if _hash_values(prev, row[:width]) != row_hash:
                return checked, seq, "its content does not match its hash"
            if row[action_at] == "audit-prune":
                prunes.add(row[target_at])
            prev, expected_seq = row_hash, seq + 1
            checked += 1
        last = rows[-1][seq_at]
        if progress:
            progress(checked)
    if marker is not None and str(marker) not in prunes:
        return checked, marker, "no audit-prune record vouches for this pruned marker"
    if head is not None and head.seq and (expected_seq or 1) - 1 != head.seq:
        return checked, (expected_seq or 1), f"the chain ends before the head ({head.seq})"
    if head is not None and prev is not None and head.hash != prev:
        return checked, last, "the last record's hash does not match the head"
    return checked, None, None


def export(since=None, until=None, batch=5000):
    """Yield the records from ``since`` (a datetime) on, oldest first, as dicts."""
    last = 0
    while True:
        query = db.select(AuditEvent).where(AuditEvent.seq > last)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if until is not None:
            query = query.where(AuditEvent.at < until)
        rows = db.session.execute(query.order_by(AuditEvent.seq).limit(batch)).scalars().all()
        if not rows:
            return
        for row in rows:
            yield to_json(row)
        last = rows[-1].seq
        db.session.expunge_all()


def prune(retention_days):
    """Delete records older than ``retention_days``; return how many went.

    The newest pruned record becomes an ``audit-pruned`` marker keeping its sequence number
    and hash (the next record's prevHash still matches), and an ``audit-prune`` record is
    appended, so ``verify`` still proves the rest of the chain.
    """
    if not retention_days or retention_days <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=retention_days)
    last = db.session.execute(db.select(db.func.max(AuditEvent.seq))
                              .where(AuditEvent.at < cutoff)).scalar()
    if last is None:
        return 0
    first = db.session.execute(db.select(AuditEvent).order_by(AuditEvent.seq).limit(1)).scalar_one()
    if first.seq == last and first.action == PRUNED:
        return 0  # only the marker itself is old
    previous = json.loads(first.detail).get("pruned", 0) if first.action == PRUNED else 0
    marker = db.session.get(AuditEvent, last)
    deleted = db.session.execute(db.delete(AuditEvent).where(AuditEvent.seq < last)).rowcount
    count = deleted + 1 - (1 if first.action == PRUNED else 0)  # the marker's record is gone too
    detail = {"pruned": previous + count, "through": last, "hash": marker.hash}
    marker.action, marker.user_email, marker.token_id, marker.client = PRUNED, None, None, None
    marker.target_type, marker.target_id, marker.outcome, marker.status = None, None, "success", None
    marker.detail = _canonical(detail)
    record("audit-prune", "audit", str(last), detail=detail)
    db.session.commit()
    return count
