"""Alembic environment: runs migrations on the app's engine against models.py's metadata.

Used through Flask-Migrate (`flask --app app db ...`) and by `db_maintenance.py`; the app's
logging configuration is kept (no fileConfig here).
"""
import logging

from alembic import context
from flask import current_app

log = logging.getLogger("alembic.env")
config = context.config
migrate = current_app.extensions["migrate"]
target_metadata = migrate.db.metadata


def skip_empty_autogenerate(_context, _revision, directives):
    """`db revision --autogenerate` writes nothing when models.py matches the database."""
    if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        log.info("No changes in schema detected.")


def run_offline():
    """`--sql` mode: print the SQL instead of running it."""
    url = migrate.db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online():
    """Run the migrations on a connection of the app's engine, in one transaction."""
    options = dict(migrate.configure_args)
    options.setdefault("process_revision_directives", skip_empty_autogenerate)
    with migrate.db.engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, **options)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
