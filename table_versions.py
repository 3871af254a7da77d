"""Version stamps of the tables whose search totals are cached, and that cache; the small
per-app LRU memos under it (``Memo``, ``app_memo``) also keep auth.py's privileges and
search.py's statements.

A COUNT over tens of thousands of matching rows costs more than the rest of a list request.
Every transaction that inserts, updates or deletes rows of a table in ``VERSIONED`` writes a
new random stamp for it (a ``system_state`` row ``version:<table>``) just before it commits,
in that same transaction: engine events see every statement SQLAlchemy runs (ORM flushes
and Core statements alike) and every commit, on every host. A total counted under one
stamp is therefore exact for as long as that stamp is current, and ``search`` reuses it
(``cached_count``).

What the event cannot see is a write that bypasses SQLAlchemy (a ``psql`` or ``sqlite3``
session on the live database): totals may then lag until the next write through the API
or a restart. Rows are never cached, only totals.
"""
import threading
from collections import OrderedDict

import sqlalchemy as sa
from flask import current_app, g
from sqlalchemy import event

from models import SystemState, db, new_ulid

VERSIONED = ("series", "clinical_cases", "case_tags")
PREFIX = "version:"
KEYS = tuple(PREFIX + table for table in VERSIONED)  # their system_state keys
_MARK = "circus.versioned_tables"  # Connection.info: tables written in this transaction
CACHE_SIZE = 1024  # totals kept per app

_STATE = SystemState.__table__
_STAMP = (_STATE.update().where(_STATE.c.key == sa.bindparam("state_key"))
          .values(value=sa.bindparam("stamp")))
_READ = sa.select(_STATE.c.key, _STATE.c.value).where(
    _STATE.c.key.in_(sa.bindparam("keys", expanding=True)))


def install(engine):
    """Stamp the versioned tables on every write through ``engine``."""
    event.listen(engine, "after_cursor_execute", _note_write)
    event.listen(engine, "commit", _stamp)
    event.listen(engine, "rollback", _forget)
    event.listen(engine, "checkin", _forget_pooled)  # a transaction the pool reset


def initial_rows():
    """The ``system_state`` rows to create with the schema (init-db, migrations)."""
    return [{"key": PREFIX + table, "value": new_ulid()} for table in VERSIONED]


def _note_write(conn, _cursor, _statement, _parameters, context, _executemany):
    """Remember which versioned tables this transaction wrote."""
    if not (context.isinsert or context.isupdate or context.isdelete) or context.compiled is None:
        return
    name = getattr(getattr(context.compiled.statement, "table", None), "name", None)
    if name in VERSIONED:
        conn.info.setdefault(_MARK, set()).add(name)


def _stamp(conn):
    """Just before the transaction commits: a new stamp for each table it wrote. Written
    last, the stamp row is locked (PostgreSQL) only while the commit itself runs. A missing
    row (a database older than this module) updates nothing: its totals are then never
    cached (see stamps())."""
    for name in sorted(conn.info.pop(_MARK, ())):
        conn.execute(_STAMP, {"state_key": PREFIX + name, "stamp": new_ulid()})


def _forget(conn, *_args):
    """The transaction was rolled back: nothing it wrote remains."""
    conn.info.pop(_MARK, None)


def _forget_pooled(_dbapi_connection, record):
    if record is not None:
        record.info.pop(_MARK, None)


def remember(found):
    """Keep the stamps the request's authentication query read (auth.py), so that
    ``stamps`` needs no query of its own: same transaction, same snapshot."""
    g.table_stamps = found


def stamps(tables):
    """The current stamps of ``tables`` as a tuple, or None if one has none."""
    keys = [PREFIX + table for table in tables]
    found = g.get("table_stamps")
    if found is None or not all(key in found for key in keys):
        found = dict(db.session.execute(_READ, {"keys": keys}).all())
    if any(found.get(key) is None for key in keys):
        return None
    return tuple(found[key] for key in keys)


def cached_count(key, tables, count):
    """The total of a search, counted by ``count()`` only when ``tables`` changed since.

    ``key`` must determine the counted statement (search.py passes its memo key, which
    names the endpoint, the caller's privileges and the query string).
    """
    db.session.flush()  # pending changes would be counted (and noted) only inside count()
    if set(tables) & db.session.connection().info.get(_MARK, set()):
        return count()  # this transaction wrote them: its rows are not the stamp's rows
    current = stamps(tables)
    if current is None:
        return count()
    return app_memo("circus.search_totals", CACHE_SIZE).get((key, current), count)


# --- per-app memos --------------------------------------------------------------------------
# Small caches of values that are pure functions of their key.

class Memo:
    """A thread-safe LRU map: ``get(key, build)`` returns the stored value or stores
    ``build()``. A ``build`` that raises stores nothing."""

    def __init__(self, size):
        self.size = size
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, build):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = build()  # outside the lock: it may run SQL or raise ApiError
        with self.lock:
            self.entries[key] = value
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def app_memo(name, size):
    """The app's ``Memo`` called ``name`` (one per app: tests run several apps in one
    process, each with its own database and configuration)."""
    memos = current_app.extensions.get(name)
    if memos is None:
        memos = current_app.extensions.setdefault(name, Memo(size))
    return memos
