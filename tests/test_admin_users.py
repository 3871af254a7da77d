"""Administration of users: /api/admin/users."""
import pytest

from auth import check_password
from models import Group, User, db

MANAGE_SERVER = "You do not have sufficient privilege to access this resource.manageServer"
NEW_USER = {"userEmail": "dave@example.com", "loginId": "dave", "password": "s3cret!",
            "loginEnabled": True, "description": "Dave", "groups": [2]}


def _login(client, username, password):
    return client.post("/login", data={"grant_type": "password", "client_id": "circus-front",
                                       "client_secret": "x", "username": username,
                                       "password": password})


DENIALS = [
    ("get", "/api/admin/users", None),
    ("get", "/api/admin/users/bob@example.com", None),
    ("patch", "/api/admin/users/bob@example.com", {"groups": [1]}),
    ("patch", "/api/admin/users/bob@example.com", {"bad": True}),
    ("post", "/api/admin/users", NEW_USER),
]


def test_needs_manage_server(client, auth_headers):
    for who in ("bob", "guest"):
        for method, path, body in DENIALS:
            res = getattr(client, method)(path, json=body, headers=auth_headers[who])
            assert (res.status_code, res.get_json()) == (401, {"error": MANAGE_SERVER}), \
                (who, method, path)


def test_mass_assignment_of_groups_is_impossible(app, client, auth_headers):
    """Nobody without manageServer can put themselves (or anyone) into a group."""
    attempts = [
        ("patch", "/api/admin/users/bob@example.com", {"groups": [1]}),
        ("post", "/api/admin/users", {**NEW_USER, "groups": [1]}),
        ("patch", "/api/admin/groups/1", {"groupName": "admin"}),
        ("patch", "/api/preferences", {"groups": [1]}),
        ("patch", "/api/preferences", {"theme": "mode_black", "groups": [1]}),
        ("patch", "/api/preferences", {"personalInfoView": True, "privileges": ["manageServer"]}),
    ]
    for method, path, body in attempts:
        res = getattr(client, method)(path, json=body, headers=auth_headers["bob"])
        assert res.status_code in (400, 401), (path, body, res.get_json())
    with app.app_context():
        assert db.session.get(User, "bob@example.com").groups == [4]
        assert db.session.get(User, "dave@example.com") is None
        assert "groups" not in db.session.get(User, "bob@example.com").preferences
    assert client.get("/api/admin/users", headers=auth_headers["bob"]).status_code == 401


def test_list_users(client, auth_headers):
    res = client.get("/api/admin/users", headers=auth_headers["alice"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 4 and body["page"] == 1
    emails = [u["userEmail"] for u in body["items"]]
    assert set(emails) == {"circus@circus.example.com", "alice@example.com",
                           "bob@example.com", "guest@example.com"}
    for item in body["items"]:
        assert "password" not in item
        assert set(item) == {"userEmail", "loginId", "description", "loginEnabled",
                             "lastLoginTime", "lastLoginIp", "groups", "preferences",
                             "createdAt", "updatedAt"}
    # default sort: newest first
    created = [u["createdAt"] for u in body["items"]]
    assert created == sorted(created, reverse=True)


def test_list_users_paging(client, auth_headers):
    headers = auth_headers["alice"]
    res = client.get('/api/admin/users?sort={"loginId":1}&limit=2&page=2', headers=headers)
    body = res.get_json()
    assert [u["loginId"] for u in body["items"]] == ["circus", "guest"]
    assert body["totalItems"] == 4 and body["page"] == 2
    res = client.get("/api/admin/users?limit=201", headers=headers)
    assert res.status_code == 400
    assert res.get_json() == {"error": "You cannot query more than 200 items at a time."}
    # unlimited is ignored here: the default page size still applies
    assert client.get("/api/admin/users?unlimited", headers=headers).status_code == 200


def test_get_user(client, auth_headers):
    res = client.get("/api/admin/users/bob@example.com", headers=auth_headers["alice"])
    assert res.status_code == 200
    doc = res.get_json()
    assert doc["loginId"] == "bob" and "password" not in doc
    res = client.get("/api/admin/users/nobody@example.com", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested user was not found."}


def test_create_user(app, client, auth_headers):
    body = {**NEW_USER, "preferences": {"theme": "mode_black"}}
    res = client.post("/api/admin/users", json=body, headers=auth_headers["alice"])
    assert res.status_code == 201
    assert res.get_json() == {"userEmail": "dave@example.com"}
    doc = client.get("/api/admin/users/dave@example.com", headers=auth_headers["alice"]).get_json()
    assert doc["lastLoginTime"] == "1970-01-01T00:00:00.000Z" and doc["lastLoginIp"] == ""
    assert doc["preferences"]["theme"] == "mode_black"
    assert doc["preferences"]["interpolationMode"] == "nearestNeighbor"  # defaults merged
    assert doc["groups"] == [2] and doc["loginEnabled"] is True
    with app.app_context():
        stored = db.session.get(User, "dave@example.com").password
        assert stored != "s3cret!" and check_password(stored, "s3cret!")
    assert _login(client, "dave", "s3cret!").status_code == 200
    assert _login(client, "dave@example.com", "s3cret!").status_code == 200


@pytest.mark.parametrize("extra", [{"lastLoginIp": "1.2.3.4"},
                                   {"lastLoginTime": "2020-01-01T00:00:00Z"}])
def test_create_user_refuses_last_login(client, auth_headers, extra):
    res = client.post("/api/admin/users", json={**NEW_USER, **extra},
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Bad Request"}


def test_create_user_bad_body(app, client, auth_headers):
    changes = [{"userEmail": "not-an-email"}, {"userEmail": "a@b@c"},
               {"userEmail": "dave@example.com\n"}, {"password": None},
               {"password": ""}, {"groups": ["admin"]}, {"myLists": []},
               {"preferences": {"theme": "pink"}}, {"isAdmin": True}]
    for change in changes:
        body = {k: v for k, v in {**NEW_USER, **change}.items() if v is not None}
        res = client.post("/api/admin/users", json=body, headers=auth_headers["alice"])
        assert res.status_code == 400, change
        assert res.get_json()["error"] == "Request data is not correct."
    with app.app_context():
        assert db.session.get(User, "dave@example.com") is None


@pytest.mark.parametrize("change, message", [
    ({"userEmail": "bob@example.com"}, "A user with this e-mail address already exists."),
    ({"loginId": "bob"}, "The login ID is already used by another user."),
    ({"loginId": "bob@example.com"}, "The login ID is already used by another user."),
])
def test_create_duplicate_user(app, client, auth_headers, change, message):
    res = client.post("/api/admin/users", json={**NEW_USER, **change},
                      headers=auth_headers["alice"])
    assert res.status_code == 409
    assert res.get_json() == {"error": message}
    with app.app_context():
        assert db.session.get(User, "bob@example.com").login_id == "bob"


def test_patch_user(app, client, auth_headers):
    body = {"description": "Bobby", "groups": [1, 4], "loginEnabled": False,
            "password": "new password", "loginId": "bobby"}
    res = client.patch("/api/admin/users/bob@example.com", json=body,
                       headers=auth_headers["alice"])
    assert res.status_code == 204 and res.data == b""
    with app.app_context():
        user = db.session.get(User, "bob@example.com")
        assert user.description == "Bobby" and user.groups == [1, 4]
        assert user.login_enabled is False and user.login_id == "bobby"
        assert check_password(user.password, "new password")
        assert user.password != "new password"


def test_patch_user_password_then_login(client, auth_headers):
    res = client.patch("/api/admin/users/guest@example.com", json={"password": "changed"},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert _login(client, "guest", "password").status_code == 400
    assert _login(client, "guest", "changed").status_code == 200


@pytest.mark.parametrize("body, status, message", [
    ({"lastLoginIp": "1.1.1.1"}, 400, "Bad Request"),
    ({"lastLoginTime": "2020-01-01T00:00:00Z"}, 400, "Bad Request"),
    ({"userEmail": "x@example.com"}, 400, "The primary key cannot be modified."),
    ({"loginId": "alice"}, 409, "The login ID is already used by another user."),
])
def test_patch_user_refusals(client, auth_headers, body, status, message):
    res = client.patch("/api/admin/users/bob@example.com", json=body,
                       headers=auth_headers["alice"])
    assert res.status_code == status
    assert res.get_json() == {"error": message}


def test_patch_user_keeps_own_login_id(client, auth_headers):
    res = client.patch("/api/admin/users/bob@example.com", json={"loginId": "bob"},
                       headers=auth_headers["alice"])
    assert res.status_code == 204


def test_patch_unknown_user(client, auth_headers):
    res = client.patch("/api/admin/users/nobody@example.com", json={"description": "x"},
                       headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The request resource was not found."}


def test_patch_user_bad_body(client, auth_headers):
    res = client.patch("/api/admin/users/bob@example.com", json={"groups": "1"},
                       headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["validationErrors"][0]["dataPath"] == ".groups"


def test_dangling_group_is_skipped(app, client, auth_headers):
    """A user in a group that does not exist keeps working (quirk 30)."""
    res = client.patch("/api/admin/users/bob@example.com", json={"groups": [4, 999]},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    res = client.get("/api/login-info/full", headers=auth_headers["bob"])
    assert res.status_code == 200
    assert res.get_json()["groups"] == ["power users"]
    with app.app_context():
        assert db.session.get(Group, 999) is None
