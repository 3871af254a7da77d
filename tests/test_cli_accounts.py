"""Account commands of cli.py: clear-token, generate-password-hash, db-check, create-user,
create-group (run through Flask's CLI runner against the test database)."""
from datetime import timedelta

import pytest

from auth import check_password, issue_login_token
from db_maintenance import RECORD_CHECKS
from models import (Group, PluginDefinition, Project, Series, ServerParam, Token, User, db,
                    utcnow)
from tests.factories import make_series


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def _session_tokens(app, expired=0, valid=0):
    with app.app_context():
        for i in range(expired + valid):
            issue_login_token("bob@example.com")
        db.session.flush()
        rows = db.session.execute(db.select(Token).where(
            Token.permanent_token_id.is_(None))).scalars().all()
        for row in rows[:expired]:
            row.access_token_expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()


def _count_tokens(app):
    with app.app_context():
        rows = db.session.execute(db.select(Token)).scalars().all()
        return (sum(r.permanent_token_id is None for r in rows),
                sum(r.permanent_token_id is not None for r in rows))


# --- clear-token --------------------------------------------------------------------------

def test_clear_token_keeps_permanent(app, runner, tokens):
    _session_tokens(app, expired=2, valid=3)
    result = runner.invoke(args=["clear-token"])
    assert result.exit_code == 0, result.output
    assert "Deleted 5 access token(s)." in result.output
    assert "Use --all flag to also delete permanent tokens." in result.output
    assert _count_tokens(app) == (0, 4)


def test_clear_token_all(app, runner, tokens):
    _session_tokens(app, valid=2)
    result = runner.invoke(args=["clear-token", "--all"])
    assert result.exit_code == 0
    assert "Deleted 6 access token(s)." in result.output
    assert "--all flag" not in result.output
    assert _count_tokens(app) == (0, 0)


def test_clear_token_expired_only(app, runner, tokens):
    _session_tokens(app, expired=2, valid=3)
    result = runner.invoke(args=["clear-token", "--expired"])
    assert "Deleted 2 access token(s)." in result.output
    assert _count_tokens(app) == (3, 4)


def test_cleared_token_no_longer_works(app, runner, client, tokens):
    result = runner.invoke(args=["clear-token", "-a"])
    assert "Deleted 4 access token(s)." in result.output
    res = client.get("/api/login-info", headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert res.status_code == 401


# --- generate-password-hash ---------------------------------------------------------------

def test_generate_password_hash(app, runner):
    result = runner.invoke(args=["generate-password-hash"], input="pa55word\npa55word\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip().splitlines()[-1]
    assert "pa55word" not in result.output  # input is hidden
    assert check_password(hashed, "pa55word") and not check_password(hashed, "other")


def test_generate_password_hash_mismatch(runner):
    result = runner.invoke(args=["generate-password-hash"], input="one\ntwo\n")
    assert result.exit_code != 0
    assert "Password mismatch." in result.output


# --- create-user / create-group -------------------------------------------------------------

def test_create_user(app, runner, client):
    result = runner.invoke(args=["create-user", "eve@example.com", "eve", "--password", "pw",
                                 "--group", "admin", "--group", "2",
                                 "--description", "Eve"])
    assert result.exit_code == 0, result.output
    assert "Created user eve@example.com (eve)." in result.output
    with app.app_context():
        user = db.session.get(User, "eve@example.com")
        assert user.groups == [1, 2] and user.description == "Eve" and user.login_enabled
        assert check_password(user.password, "pw")
        assert user.preferences["theme"] == "mode_white"  # defaults, as the API stores them
    res = client.post("/login", data={"grant_type": "password", "client_id": "circus-front",
                                      "client_secret": "x", "username": "eve", "password": "pw"})
    assert res.status_code == 200


def test_create_user_prompts_for_password(app, runner):
    result = runner.invoke(args=["create-user", "eve@example.com", "eve"], input="pw\npw\n")
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert check_password(db.session.get(User, "eve@example.com").password, "pw")


@pytest.mark.parametrize("args, message", [
    (["circus@circus.example.com", "x"], "A user with this e-mail address already exists."),
    (["x@example.com", "circus"], "The login ID is already used by another user."),
    (["not an email", "x"], "Request data is not correct."),
    (["x@example.com", "x", "--group", "nonexistent"], "No group 'nonexistent'."),
])
def test_create_user_refusals(app, runner, args, message):
    result = runner.invoke(args=["create-user", *args, "--password", "pw"])
    assert result.exit_code != 0
    assert message in result.output
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(User)).scalar() == 1


def test_create_group(app, runner):
    result = runner.invoke(args=["create-group", "uploaders", "--privilege", "downloadVolume",
                                 "--privilege", "issueOnetime", "--domain", "sirius.org"])
    assert result.exit_code == 0, result.output
    assert "Created group 3 (uploaders)." in result.output
    with app.app_context():
        group = db.session.get(Group, 3)
        assert group.privileges == ["downloadVolume", "issueOnetime"]
        assert group.domains == ["sirius.org"] and group.read_projects == []
    result = runner.invoke(args=["create-user", "u@example.com", "u", "--password", "p",
                                 "--group", "uploaders"])
    assert result.exit_code == 0, result.output


def test_create_group_refuses_unknown_privilege(runner):
    result = runner.invoke(args=["create-group", "x", "--privilege", "fly"])
    assert result.exit_code != 0
    assert "fly" in result.output


# --- db-check --------------------------------------------------------------------------------

def test_db_check_clean_database(app, runner, tokens):
    with app.app_context():
        make_series("1.2.3.4")
        db.session.add(PluginDefinition(
            plugin_id="a" * 64, type="CAD", plugin_name="p", version="1.0.0", description="",
            run_configuration={"timeout": 900, "gpus": ""}, display_strategy=[],
            icon={"glyph": "calc", "color": "#ffffff", "backgroundColor": "#008800"}))
        db.session.commit()
    result = runner.invoke(args=["db-check"])
    assert result.exit_code == 0, result.output
    assert "Validating: groups" in result.output
    assert "Validating: users" in result.output
    assert "  Validated: 4 items." in result.output  # groups and users
    assert "  Validated: 1 item." in result.output  # projects, serverParams, series, plug-ins
    assert "Validating: pluginDefinitions" in result.output


def test_db_check_target(runner):
    result = runner.invoke(args=["db-check", "-t", "projects"])
    assert result.exit_code == 0
    assert result.output.splitlines() == ["Validating: projects", "  Validated: 1 item."]


@pytest.mark.parametrize("target, corrupt, where", [
    ("groups", lambda: setattr(db.session.get(Group, 2), "privileges", ["fly"]), ".privileges[0]"),
    ("users", lambda: setattr(db.session.get(User, "circus@circus.example.com"), "preferences",
                              {"theme": "pink"}), ".preferences.theme"),
    ("projects", lambda: setattr(db.session.execute(db.select(Project)).scalar_one(),
                                 "window_priority", "never"), ".windowPriority"),
    ("serverParams", lambda: db.session.add(ServerParam(key="domains2", value=1)) or setattr(
        db.session.get(ServerParam, "domains"), "value", "default"), ".domains"),
    ("series", lambda: setattr(db.session.get(Series, "1.2.3.4"), "images", "1-x"), ".images"),
    ("pluginDefinitions", lambda: db.session.add(PluginDefinition(
        plugin_id="a" * 64, type="CAD", plugin_name="p", version="one", description="",
        run_configuration={}, icon={}, display_strategy=[])), ".version"),
])
def test_db_check_reports_first_invalid(app, runner, target, corrupt, where):
    with app.app_context():
        make_series("1.2.3.4")
        corrupt()
        db.session.commit()
    result = runner.invoke(args=["db-check"])
    assert result.exit_code == 1
    assert f"There was a validation error in {target}" in result.output
    assert where in result.output
    # stops at the first invalid collection
    later = list(RECORD_CHECKS)[list(RECORD_CHECKS).index(target) + 1:]
    assert not [name for name in later if f"Validating: {name}" in result.output]
