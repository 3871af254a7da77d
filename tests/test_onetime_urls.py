"""One-time login URLs: POST /api/admin/onetime-urls and their use at POST /login."""
import re
from datetime import timedelta

from auth import digest
from models import OnetimeUrl, User, db
from tests.factories import make_user


def _issue(client, headers, user):
    return client.post("/api/admin/onetime-urls", json={"user": user}, headers=headers)


def _login(client, string, username=None):
    return client.post("/login", data={
        "grant_type": "password", "client_id": "circus-front", "client_secret": "x",
        "username": string if username is None else username, "password": string})


def test_needs_issue_onetime(client, auth_headers):
    """Even the default admin (manageServer) lacks issueOnetime."""
    for who in ("bob", "guest", "circus"):
        res = _issue(client, auth_headers[who], "bob")
        assert res.status_code == 401, who
        assert res.get_json() == {
            "error": "You do not have sufficient privilege to access this resource.issueOnetime"}


def test_issue_and_use(app, client, auth_headers):
    res = _issue(client, auth_headers["alice"], "bob")
    assert res.status_code == 201
    string = res.get_json()["onetimeString"]
    assert re.fullmatch(r"[0-9a-z]{32}", string)
    with app.app_context():
        row = db.session.execute(db.select(OnetimeUrl)).scalar_one()
        assert row.user_email == "bob@example.com"
        assert row.onetime_string_hash == digest(string)
        assert len(row.onetime_url_id) == 26
    res = _login(client, string)
    assert res.status_code == 200
    token = res.get_json()["access_token"]
    info = client.get("/api/login-info", headers={"Authorization": f"Bearer {token}"})
    assert info.get_json()["userEmail"] == "bob@example.com"
    # consumed
    assert _login(client, string).status_code == 400
    with app.app_context():
        assert db.session.execute(db.select(OnetimeUrl)).first() is None


def test_issue_by_email(client, auth_headers):
    res = _issue(client, auth_headers["alice"], "guest@example.com")
    assert res.status_code == 201
    assert _login(client, res.get_json()["onetimeString"]).status_code == 200


def test_username_must_equal_string(client, auth_headers):
    string = _issue(client, auth_headers["alice"], "bob").get_json()["onetimeString"]
    res = _login(client, string, username="bob")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Invalid grant: user credentials are invalid"}


def test_expired_string(app, client, auth_headers):
    string = _issue(client, auth_headers["alice"], "bob").get_json()["onetimeString"]
    with app.app_context():
        row = db.session.execute(db.select(OnetimeUrl)).scalar_one()
        row.created_at -= timedelta(seconds=61)
        db.session.commit()
    assert _login(client, string).status_code == 400


def test_expired_strings_are_swept(app, client, auth_headers):
    _issue(client, auth_headers["alice"], "bob")
    with app.app_context():
        row = db.session.execute(db.select(OnetimeUrl)).scalar_one()
        row.created_at -= timedelta(seconds=120)
        db.session.commit()
    _issue(client, auth_headers["alice"], "guest")
    with app.app_context():
        rows = db.session.execute(db.select(OnetimeUrl)).scalars().all()
        assert [r.user_email for r in rows] == ["guest@example.com"]


def test_unknown_user(client, auth_headers):
    res = _issue(client, auth_headers["alice"], "nobody")
    assert res.status_code == 404
    assert res.get_json() == {"error": "Not Found"}


def test_ambiguous_user(app, client, auth_headers):
    with app.app_context():
        make_user("zed@example.com", "bob@example.com")
        db.session.commit()
    res = _issue(client, auth_headers["alice"], "bob@example.com")
    assert res.status_code == 404


def test_login_disabled(app, client, auth_headers):
    with app.app_context():
        db.session.get(User, "bob@example.com").login_enabled = False
        db.session.commit()
    res = _issue(client, auth_headers["alice"], "bob")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Bad Request"}


def test_bad_body(app, client, auth_headers):
    for body in [{}, {"user": 1}, {"user": "bob", "ttl": 9999}, {"user": ""}]:
        res = client.post("/api/admin/onetime-urls", json=body, headers=auth_headers["alice"])
        assert res.status_code == 400, body
        assert res.get_json()["error"] == "Request data is not correct."
    with app.app_context():
        assert db.session.execute(db.select(OnetimeUrl)).first() is None
