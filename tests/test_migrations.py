"""Schema versions: init-db and migrate build and upgrade databases without losing rows."""
from datetime import datetime

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

import db_maintenance
from app import MIGRATIONS_DIR, create_app
from models import User, db
from tests.scratch_db import scratch_database  # noqa: F401  (fixture)

SCRIPTS = ScriptDirectory(MIGRATIONS_DIR)
HEAD = SCRIPTS.get_current_head()
BASELINE = SCRIPTS.get_base()
DRIFT = ("models.py and migrations/versions disagree: add a revision with "
         "`flask --app app db revision --autogenerate -m \"what changed\"`")


@pytest.fixture
def empty_app(tmp_path, scratch_database):  # noqa: F811
    """An app on a database of its own: empty, no tables, no version."""
    app = create_app({"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path / "data"),
                      "DATABASE_URL": scratch_database,
                      "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000"})
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def run(app, *args):
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.output


def insert_baseline_user(email):
    """A user row written with the columns the baseline revision has (not today's model)."""
    with db.engine.begin() as connection:
        users = sa.Table("users", sa.MetaData(), autoload_with=connection)
        now = datetime(2024, 5, 6, 7, 8, 9)
        connection.execute(users.insert().values(
            user_email=email, login_id="old", password="pbkdf2:sha256:1000$x$y",
            description="made before the upgrade", login_enabled=True, last_login_time=now,
            last_login_ip="127.0.0.1", groups=[1], preferences={"theme": "mode_black"},
            created_at=now, updated_at=now))


def test_revisions_build_exactly_the_models_schema(empty_app):
    with empty_app.app_context():
        flask_migrate.upgrade()
        assert db_maintenance.current_revision() == HEAD
        assert db_maintenance.schema_differences() == [], DRIFT


def test_init_db_creates_the_newest_schema_and_is_idempotent(empty_app):
    assert "Schema: created" in run(empty_app, "init-db")
    second = run(empty_app, "init-db")
    assert "Schema: current" in second and "Nothing to do" in second
    with empty_app.app_context():
        assert db_maintenance.current_revision() == HEAD
        assert db_maintenance.schema_differences() == []
        assert db.session.get(User, "circus@circus.example.com") is not None


@pytest.mark.parametrize("command", ["migrate", "init-db"])
def test_upgrade_of_an_older_database_keeps_its_rows(empty_app, command):
    assert BASELINE != HEAD, "the test needs a revision after the baseline"
    with empty_app.app_context():
        flask_migrate.upgrade(revision=BASELINE)
        insert_baseline_user("old@example.com")
        assert db_maintenance.schema_differences() != []  # the older schema really is older
    assert f"Schema: upgraded from {BASELINE}" in run(empty_app, command)
    with empty_app.app_context():
        assert db_maintenance.current_revision() == HEAD
        assert db_maintenance.schema_differences() == [], DRIFT
        user = db.session.get(User, "old@example.com")
        assert (user.login_id, user.description, user.groups, user.preferences) == (
            "old", "made before the upgrade", [1], {"theme": "mode_black"})
        assert user.last_login_time == datetime(2024, 5, 6, 7, 8, 9)
        # The search totals' version stamps exist after either command (revision 0004).
        import table_versions
        assert table_versions.stamps(table_versions.VERSIONED) is not None
    assert "Schema: current" in run(empty_app, "migrate")


def test_migrate_stamps_tables_made_before_migrations_existed(empty_app):
    with empty_app.app_context():
        db.create_all()
        assert db_maintenance.current_revision() is None
    assert "Schema: stamped" in run(empty_app, "migrate")
    with empty_app.app_context():
        assert db_maintenance.current_revision() == HEAD


def test_migrate_refuses_unversioned_tables_that_differ_from_the_models(empty_app):
    with empty_app.app_context():
        db.create_all()
        db.metadata.sorted_tables[-1].drop(db.engine)  # a table nothing refers to
    result = empty_app.test_cli_runner().invoke(args=["migrate"])
    assert result.exit_code != 0
    assert "no schema version" in result.output and "db stamp" in result.output
    with empty_app.app_context():
        assert db_maintenance.current_revision() is None
