"""A database of the test's own, for tests that build schemas or start servers.

On SQLite (no DATABASE_URL) the test's data directory holds it, so the URL is None. On
PostgreSQL a new database is created beside DATABASE_URL's and dropped afterwards, so these
tests never touch the tables the ``app`` fixture shares.
"""
import os
import secrets
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from config import database_uri


@contextmanager
def scratch_database_url():
    """DATABASE_URL of a new empty database, or None when the suite runs on SQLite."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        yield None
        return
    name = "circus_scratch_" + secrets.token_hex(4)
    admin = sa.create_engine(database_uri({"DATABASE_URL": url}), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def scratch_database():
    """Fixture form of scratch_database_url()."""
    with scratch_database_url() as url:
        yield url
