"""Exactly-once claims of queued rows, shared by tasks and plug-in jobs.

A claim reads the first candidate row and, in the same transaction, takes it with a
conditional UPDATE that only matches while the row is still unclaimed: of any number of
workers racing for one row, exactly one sees its UPDATE change the row. On PostgreSQL the
candidate is read FOR UPDATE SKIP LOCKED, so racing workers pass over a row being taken
instead of waiting for it.
"""
from models import db


def claim_first(candidate, claim):
    """Take the first row of ``candidate``; return its key, or None when there is none or
    another worker took it first.

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
