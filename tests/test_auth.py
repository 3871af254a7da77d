"""Authentication: the fail-closed hook, tokens at rest, /login grants."""
import pytest

from auth import digest
from models import GROUPS_STAMP, Group, SystemState, Token, db


def test_status_needs_no_token(client):
    res = client.get("/api/status")
    assert res.status_code == 200
    assert res.get_json() == {"status": "running"}
    assert res.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("headers, status, message", [
    ({}, 401, "Unauthorized request: no authentication given"),
    ({"Authorization": "Basic abc"}, 400, "Invalid request: malformed authorization header"),
    ({"Authorization": "Bearer 5ccec1795806a75fd3ea6800e99ade60ddda76bb"}, 401,
     "Invalid token: access token is invalid"),
])
def test_bad_credentials(client, tokens, headers, status, message):
    res = client.get("/api/login-info", headers=headers)
    assert res.status_code == status
    assert res.get_json() == {"error": message}


def test_token_in_query_is_refused(client, tokens):
    res = client.get(f"/api/login-info?access_token={tokens['alice']}")
    assert res.status_code == 400
    assert "query URLs" in res.get_json()["error"]


def test_tokens_are_stored_hashed(app, client, tokens):
    res = client.get("/api/login-info", headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert res.get_json() == {"userEmail": "bob@example.com", "loginId": "bob"}
    with app.app_context():
        rows = db.session.execute(db.select(Token)).scalars().all()
        stored = {r.access_token_hash for r in rows}
        assert digest(tokens["bob"]) in stored
        assert tokens["bob"] not in stored


def _login(client, **form):
    data = {"grant_type": "password", "client_id": "circus-front", "client_secret": "x", **form}
    return client.post("/login", data=data)


def test_password_grant_and_refresh(client):
    res = _login(client, username="circus", password="circus")
    assert res.status_code == 200, res.get_json()
    body = res.get_json()
    assert body["token_type"] == "Bearer" and len(body["access_token"]) == 40
    assert res.headers["Cache-Control"] == "no-store"
    info = client.get("/api/login-info", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert info.get_json()["userEmail"] == "circus@circus.example.com"
    res = client.post("/login", data={"grant_type": "refresh_token", "client_id": "circus-front",
                                      "client_secret": "x", "refresh_token": body["refresh_token"]})
    assert res.status_code == 200
    new = res.get_json()
    assert new["access_token"] != body["access_token"]
    old = client.get("/api/login-info", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert old.status_code == 401


def test_wrong_password(client):
    res = _login(client, username="circus", password="wrong")
    assert res.status_code == 400
    assert res.get_json() == {"error": "Invalid grant: user credentials are invalid"}


def test_login_needs_form_and_client(client):
    res = client.post("/login", json={"grant_type": "password"})
    assert res.status_code == 400
    res = client.post("/login", data={"grant_type": "password", "username": "circus",
                                      "password": "circus"})
    assert res.get_json() == {"error": "Invalid client: cannot retrieve client credentials"}


def test_logout_keeps_permanent_tokens(client, tokens):
    res = _login(client, username="circus", password="circus")
    session = res.get_json()["access_token"]
    assert client.get("/api/logout", headers={"Authorization": f"Bearer {session}"}).status_code == 204
    assert client.get("/api/login-info", headers={"Authorization": f"Bearer {session}"}).status_code == 401
    perm = client.get("/api/login-info", headers={"Authorization": f"Bearer {tokens['circus']}"})
    assert perm.status_code == 200


def test_unknown_route_is_json_404(client):
    res = client.get("/api/nothing-here")
    assert res.status_code == 404
    assert res.get_json() == {"error": "Not found"}


def test_options_preflight_without_token(client):
    res = client.options("/api/whatever")
    assert res.status_code == 200
    assert res.headers["Access-Control-Allow-Methods"].startswith("POST")


def test_malformed_json_and_content_type(client, auth_headers):
    h = auth_headers["alice"]
    res = client.post("/api/tokens", data="{not json", headers={**h, "Content-Type": "application/json"})
    assert res.status_code == 400
    assert res.get_json()["error"].startswith("Invalid JSON as request body.")
    res = client.post("/api/tokens", data="x", headers={**h, "Content-Type": "text/plain"})
    assert res.status_code == 415
    res = client.post("/api/tokens", data="x", headers=h)
    assert res.status_code == 400
    assert res.get_json() == {"error": "Content-type is unspecified."}


def test_case_insensitive_paths_and_trailing_slash(client, auth_headers):
    assert client.get("/api/Login-Info", headers=auth_headers["bob"]).status_code == 200
    assert client.get("/api/login-info/", headers=auth_headers["bob"]).status_code == 200


def test_permanent_tokens_owner_only(client, auth_headers):
    res = client.post("/api/tokens", json={"description": "script"}, headers=auth_headers["bob"])
    assert res.status_code == 201
    token_id = res.get_json()["tokenId"]
    listed = client.get("/api/tokens", headers=auth_headers["bob"]).get_json()
    assert [t["tokenId"] for t in listed["items"]].count(token_id) == 1
    assert "accessToken" not in listed["items"][0]
    assert client.delete(f"/api/tokens/{token_id}", headers=auth_headers["alice"]).status_code == 404
    assert client.delete(f"/api/tokens/{token_id}", headers=auth_headers["bob"]).status_code == 204


def test_token_limit(client, auth_headers):
    for i in range(10):
        assert client.post("/api/tokens", json={"description": f"t{i}"},
                           headers=auth_headers["guest"]).status_code == 201
    # guest has 11 now (one from the fixture): CIRCUS refuses only beyond "more than 10"
    res = client.post("/api/tokens", json={"description": "one more"}, headers=auth_headers["guest"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "You cannot create more than 10 tokens."}


def test_schema_errors_have_validation_errors(client, auth_headers):
    res = client.post("/api/tokens", json={"description": "x", "extra": 1}, headers=auth_headers["bob"])
    assert res.status_code == 400
    body = res.get_json()
    assert body["error"] == "Request data is not correct."
    assert body["validationErrors"][0]["keyword"] == "additionalProperties"


# --- privileges cached per groupsStamp --------------------------------------------------

def _groups_stamp(app):
    with app.app_context():
        row = db.session.get(SystemState, GROUPS_STAMP)
        return row and row.value


def test_revoking_a_privilege_applies_at_once(app, client, auth_headers):
    """Privileges are reused between requests only while no group changed."""
    url = "/api/admin/groups"
    assert client.get(url, headers=auth_headers["alice"]).status_code == 200
    assert client.get(url, headers=auth_headers["alice"]).status_code == 200  # cached now
    before = _groups_stamp(app)
    res = client.patch("/api/admin/groups/3", json={"privileges": ["createProject"]},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert _groups_stamp(app) != before
    assert client.get(url, headers=auth_headers["alice"]).status_code == 401


def test_group_changed_outside_the_api_applies_at_once(app, client, auth_headers):
    """A script or CLI command changing a group through the models renews the stamp too."""
    assert client.get("/api/series", headers=auth_headers["bob"]).status_code == 200
    res = client.get("/api/login-info/full", headers=auth_headers["bob"])
    assert res.get_json()["domains"] == ["default"]
    with app.app_context():
        group = db.session.get(Group, 4)
        group.domains = ["default", "other"]
        db.session.commit()
    res = client.get("/api/login-info/full", headers=auth_headers["bob"])
    assert res.get_json()["domains"] == ["default", "other"]
    with app.app_context():
        db.session.delete(db.session.get(Group, 4))
        db.session.commit()
    res = client.get("/api/login-info/full", headers=auth_headers["bob"])
    assert res.get_json()["domains"] == []


def test_users_sharing_groups_share_nothing_else(client, auth_headers):
    """The cache is keyed by the group list: a user without groups gets no privilege."""
    assert client.get("/api/admin/groups", headers=auth_headers["alice"]).status_code == 200
    assert client.get("/api/admin/groups", headers=auth_headers["guest"]).status_code == 401
    res = client.get("/api/login-info/full", headers=auth_headers["guest"])
    assert res.get_json()["domains"] == [] and res.get_json()["globalPrivileges"] == []
