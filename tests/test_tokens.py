"""Permanent tokens: /api/tokens with scopes and expiry, lastUsedAt, the CLI's options."""
from datetime import timedelta

import pytest

from models import Token, db, utcnow
from tests.case_helpers import UID1, create_case, seed_series


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def new_token(client, headers, status=201, **fields):
    res = client.post("/api/tokens", json={"description": "script", **fields}, headers=headers)
    assert res.status_code == status, res.get_json()
    return res.get_json()


def listed(client, headers, token_id):
    items = client.get("/api/tokens", headers=headers).get_json()["items"]
    return next(item for item in items if item["tokenId"] == token_id)


def test_a_token_made_as_before_keeps_every_right_and_never_expires(client, auth_headers):
    made = new_token(client, auth_headers["alice"])
    item = listed(client, auth_headers["alice"], made["tokenId"])
    assert item["scopes"] is None and item["expiresAt"] is None
    assert item["createdAt"].endswith("Z")
    res = client.get("/api/admin/users", headers=bearer(made["accessToken"]))
    assert res.status_code == 200


def test_scopes_and_expiry_are_listed(client, auth_headers):
    made = new_token(client, auth_headers["bob"], scopes=["read", "upload"], expiresIn=3600)
    item = listed(client, auth_headers["bob"], made["tokenId"])
    assert item["scopes"] == ["read", "upload"]
    assert item["expiresAt"] > utcnow().isoformat()
    assert item["lastUsedAt"] is None
    at = (utcnow() + timedelta(days=2)).isoformat() + "Z"
    made = new_token(client, auth_headers["bob"], scopes=["write"], expiresAt=at)
    assert listed(client, auth_headers["bob"], made["tokenId"])["expiresAt"][:16] == at[:16]


@pytest.mark.parametrize("fields, message", [
    ({"scopes": ["read", "everything"]}, "Unknown token scope: everything"),
    ({"scopes": []}, "at least one scope"),
    ({"expiresIn": 0}, "expiresIn must be a positive"),
    ({"expiresIn": -60}, "expiresIn must be a positive"),
    ({"expiresAt": "2001-01-01T00:00:00Z"}, "expiresAt must lie in the future"),
    ({"expiresAt": "tomorrow"}, "expiresAt must be an ISO-8601"),
    ({"expiresIn": 60, "expiresAt": "2999-01-01T00:00:00Z"}, "either expiresIn or expiresAt"),
])
def test_bad_scopes_and_expiries_answer_400(client, auth_headers, fields, message):
    res = client.post("/api/tokens", json={"description": "x", **fields},
                      headers=auth_headers["bob"])
    assert res.status_code == 400
    assert message in res.get_json()["error"]


def test_an_expired_token_answers_401_as_an_expired_access_token(app, client, auth_headers):
    made = new_token(client, auth_headers["bob"], expiresIn=60)
    assert client.get("/api/login-info", headers=bearer(made["accessToken"])).status_code == 200
    with app.app_context():
        row = db.session.execute(db.select(Token).where(
            Token.permanent_token_id == made["tokenId"])).scalar_one()
        row.access_token_expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    res = client.get("/api/login-info", headers=bearer(made["accessToken"]))
    assert res.status_code == 401
    assert res.get_json() == {"error": "Invalid token: access token has expired"}


def test_a_read_token_reads_but_may_not_post(app, client, auth_headers):
    seed_series(app)
    token = new_token(client, auth_headers["bob"], scopes=["read"])["accessToken"]
    assert client.get("/api/series", headers=bearer(token)).status_code == 200
    assert client.get(f"/api/series/{UID1}", headers=bearer(token)).status_code == 200
    res = client.post("/api/tokens", json={"description": "more"}, headers=bearer(token))
    assert res.status_code == 403
    assert res.get_json()["error"] == "This token's scopes (read) do not allow POST /api/tokens."
    res = client.delete(f"/api/series/{UID1}", headers=bearer(token))
    assert res.status_code == 403


def test_an_upload_token_uploads_but_may_not_touch_a_case(app, client, auth_headers,
                                                          default_project, dicom_dir):
    seed_series(app)
    case_id = create_case(client, auth_headers["alice"], default_project)
    token = new_token(client, auth_headers["alice"], scopes=["upload"])["accessToken"]
    for res in (client.get(f"/api/cases/{case_id}", headers=bearer(token)),
                client.post("/api/cases", json={}, headers=bearer(token)),
                client.get("/api/series", headers=bearer(token))):
        assert res.status_code == 403
        assert "scopes (upload)" in res.get_json()["error"]
    sample = next((dicom_dir / "head-first").iterdir())
    with open(sample, "rb") as fh:
        res = client.post("/api/series/domain/default/single", headers=bearer(token),
                          data={"files": (fh, "one.dcm")}, content_type="multipart/form-data")
    assert res.status_code == 201, res.get_json()


def test_a_write_token_may_not_use_admin_routes_an_admin_token_may(client, auth_headers):
    write = new_token(client, auth_headers["alice"], scopes=["write"])["accessToken"]
    res = client.get("/api/admin/users", headers=bearer(write))
    assert res.status_code == 403
    assert res.get_json()["error"] == ("This token's scopes (write) do not allow "
                                       "GET /api/admin/users.")
    assert client.get("/api/series", headers=bearer(write)).status_code == 200
    admin = new_token(client, auth_headers["alice"], scopes=["admin"])["accessToken"]
    assert client.get("/api/admin/users", headers=bearer(admin)).status_code == 200


def test_scopes_never_add_to_the_owners_rights(client, auth_headers):
    admin = new_token(client, auth_headers["bob"], scopes=["admin"])["accessToken"]
    assert client.get("/api/admin/users", headers=bearer(admin)).status_code == 401


def test_a_scoped_token_cannot_make_a_broader_token(client, auth_headers):
    write = new_token(client, auth_headers["bob"], scopes=["write"])["accessToken"]
    new_token(client, bearer(write), scopes=["read"])
    for fields in ({"scopes": ["admin"]}, {}):
        res = client.post("/api/tokens", json={"description": "x", **fields},
                          headers=bearer(write))
        assert res.status_code == 403
        assert res.get_json()["error"] == \
            "A token cannot create a token with scopes beyond its own."


def test_last_used_at_is_written_at_most_once_a_minute(app, client, auth_headers):
    made = new_token(client, auth_headers["bob"])
    client.get("/api/login-info", headers=bearer(made["accessToken"]))
    first = listed(client, auth_headers["bob"], made["tokenId"])["lastUsedAt"]
    assert first is not None
    with app.app_context():
        row = db.session.execute(db.select(Token).where(
            Token.permanent_token_id == made["tokenId"])).scalar_one()
        written = row.last_used_at
    for _ in range(3):
        client.get("/api/login-info", headers=bearer(made["accessToken"]))
    with app.app_context():
        row = db.session.execute(db.select(Token).where(
            Token.permanent_token_id == made["tokenId"])).scalar_one()
        assert row.last_used_at == written
        row.last_used_at = written - timedelta(seconds=61)
        db.session.commit()
    client.get("/api/login-info", headers=bearer(made["accessToken"]))
    with app.app_context():
        row = db.session.execute(db.select(Token).where(
            Token.permanent_token_id == made["tokenId"])).scalar_one()
        assert row.last_used_at > written - timedelta(seconds=61)


def test_cli_add_permanent_token_takes_scope_and_expires(app, client, tokens):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["add-permanent-token", "bob", "--scope", "read",
                                 "--expires", "3600"])
    assert result.exit_code == 0, result.output
    assert "Scopes: read; expires: 20" in result.output
    token = result.output.strip().splitlines()[-1]
    assert client.get("/api/login-info", headers=bearer(token)).status_code == 200
    res = client.post("/api/tokens", json={"description": "x"}, headers=bearer(token))
    assert res.status_code == 403
    for args in (["--scope", "everything"], ["--expires", "-5"], ["--expires", "0"],
                 ["--expires", "2001-01-01"]):
        result = runner.invoke(args=["add-permanent-token", "bob", *args])
        assert result.exit_code != 0, args


def test_scopes_on_dicomweb(app, client, auth_headers, dicom_dir):
    """read searches and retrieves but may not STOW; upload may STOW but not search."""
    seed_series(app)
    read = new_token(client, auth_headers["alice"], scopes=["read"])["accessToken"]
    upload = new_token(client, auth_headers["alice"], scopes=["upload"])["accessToken"]
    assert client.get("/dicom-web/studies", headers=bearer(read)).status_code == 200
    body, boundary = _stow_body((dicom_dir / "head-first" / "head-first001.dcm").read_bytes())
    stow = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    res = client.post("/dicom-web/studies", data=body, headers={**bearer(read), **stow})
    assert res.status_code == 403 and "scopes (read)" in res.get_json()["error"]
    assert client.get("/dicom-web/studies", headers=bearer(upload)).status_code == 403
    res = client.post("/dicom-web/studies", data=body, headers={**bearer(upload), **stow})
    assert res.status_code == 200


def _stow_body(data, boundary="stow-boundary"):
    part = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + data + b"\r\n"
    return part + f"--{boundary}--\r\n".encode(), boundary
