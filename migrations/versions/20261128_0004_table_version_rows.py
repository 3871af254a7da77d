"""system_state: the version stamps of the searched tables (table_versions.py)

Without these rows search totals are counted on every request; with them a total is
reused until its tables change.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 11:30:00

"""
import os
import time

import sqlalchemy as sa
from alembic import op


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

TABLES = ("series", "clinical_cases", "case_tags")  # table_versions.VERSIONED at this revision
STATE = sa.table("system_state", sa.column("key", sa.String), sa.column("value", sa.JSON))


def _stamp():
    return f"{int(time.time() * 1000):x}-{os.urandom(10).hex()}"


def upgrade():
    connection = op.get_bind()
    keys = ["version:" + table for table in TABLES]
    present = set(connection.execute(
        sa.select(STATE.c.key).where(STATE.c.key.in_(keys))).scalars())
    rows = [{"key": key, "value": _stamp()} for key in keys if key not in present]
    if rows:
        op.bulk_insert(STATE, rows)


def downgrade():
    op.execute(STATE.delete().where(STATE.c.key.like("version:%")))
