"""Schema versions: Alembic (through Flask-Migrate) keeps the database at models.py's schema.

The revisions live in ``migrations/versions``. ``prepare()`` is what ``init-db`` and
``migrate`` run: a new database gets the whole schema and is stamped at the newest revision;
a versioned one is upgraded in place, keeping its rows. When models.py changes, its author
adds a revision with ``flask --app app db revision --autogenerate -m "what changed"``.
"""
import logging

import flask_migrate
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from models import db

log = logging.getLogger(__name__)
VERSION_TABLE = "alembic_version"


class UnversionedSchemaError(Exception):
    """Raised when a database has tables but no schema version, and they differ from models.py."""


def current_revision():
    """The revision the database is stamped with, or None."""
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_differences():
    """Alembic's list of differences between the database and models.py (empty: in step)."""
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, db.metadata)


def prepare():
    """Bring the database to the newest revision without losing rows.

    Returns
    -------
    str
        What was done: ``"created"`` (new database), ``"upgraded from <rev>"``, ``"current"``
        (nothing to do) or ``"stamped"`` (tables made before migrations existed, in step
        with models.py).

    Raises
    ------
    UnversionedSchemaError
        The database has tables, no version, and a schema that differs from models.py.
    """
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)  # its INFO lines repeat on every connection
    try:
        return _prepare()
    finally:
        alembic_log.setLevel(level)


def _prepare():
    tables = set(sa.inspect(db.engine).get_table_names())
    if VERSION_TABLE in tables:
        before = current_revision()
        flask_migrate.upgrade()
        after = current_revision()
        if before == after:
            return "current"
        log.info("Schema upgraded from revision %s to %s.", before, after)
        return f"upgraded from {before}"
    if not tables & set(db.metadata.tables):
        db.create_all()
        flask_migrate.stamp()
        return "created"
    differences = schema_differences()
    if differences:
        raise UnversionedSchemaError(
            "The database has tables but no schema version, and they differ from models.py: "
            "stamp the revision they match with `flask --app app db stamp REVISION`, then run "
            f"`flask --app app migrate`. Differences: {differences}")
    flask_migrate.stamp()
    return "stamped"
