"""The caller's preferences: /api/preferences."""
from accounts import DEFAULT_PREFERENCES
from models import User, db


def test_defaults_fill_missing_keys(client, auth_headers):
    res = client.get("/api/preferences", headers=auth_headers["bob"])
    assert res.status_code == 200
    # bob's stored preferences are {"personalInfoView": true}
    assert res.get_json() == {**DEFAULT_PREFERENCES, "personalInfoView": True}
    assert set(res.get_json()) == set(DEFAULT_PREFERENCES)


def test_default_values(client, auth_headers):
    doc = client.get("/api/preferences", headers=auth_headers["bob"]).get_json()
    assert doc["theme"] == "mode_white" and doc["initailAlphaForNewLabels"] == 1
    assert doc["labelColors"] == {"useDefault": True, "customColors": []}
    assert doc["dimmedOutlineFor2DLabels"] == "show" and doc["scrollBarsInfo"] == {}


def test_needs_token(client):
    assert client.get("/api/preferences").status_code == 401
    assert client.patch("/api/preferences", json={"theme": "mode_black"}).status_code == 401


def test_patch_merges_shallowly(app, client, auth_headers):
    headers = auth_headers["guest"]
    res = client.patch("/api/preferences", json={"theme": "mode_black",
                                                 "labelColors": {"useDefault": False}},
                       headers=headers)
    assert res.status_code == 204 and res.data == b""
    res = client.patch("/api/preferences", json={"scrollBarsInfo": {"size": "large"}},
                       headers=headers)
    assert res.status_code == 204
    with app.app_context():
        stored = db.session.get(User, "guest@example.com").preferences
    assert stored == {"personalInfoView": True, "theme": "mode_black",
                      "labelColors": {"useDefault": False}, "scrollBarsInfo": {"size": "large"}}
    doc = client.get("/api/preferences", headers=headers).get_json()
    assert doc["labelColors"] == {"useDefault": False}  # shallow, not deep
    assert doc["theme"] == "mode_black"


def test_patch_only_touches_the_caller(app, client, auth_headers):
    client.patch("/api/preferences", json={"theme": "mode_black"}, headers=auth_headers["bob"])
    with app.app_context():
        assert "theme" not in db.session.get(User, "guest@example.com").preferences


def test_patch_refuses(app, client, auth_headers):
    bodies = [{}, [], {"theme": "pink"}, {"groups": [1]}, {"loginEnabled": True},
              {"privileges": ["manageServer"]}, {"theme": "mode_black", "groups": [1]},
              {"initailAlphaForNewLabels": 2}, {"labelColors": {"customColors": ["red"]}},
              {"scrollBarsInfo": {"colour": "x"}}, {"personalInfoView": "yes"}]
    for body in bodies:
        res = client.patch("/api/preferences", json=body, headers=auth_headers["bob"])
        assert res.status_code == 400, body
        assert res.get_json()["error"] == "Request data is not correct."
    with app.app_context():
        assert db.session.get(User, "bob@example.com").preferences == {"personalInfoView": True}
        assert db.session.get(User, "bob@example.com").groups == [4]


def test_patch_error_names_the_field(client, auth_headers):
    res = client.patch("/api/preferences", json={"theme": "pink"}, headers=auth_headers["bob"])
    error = res.get_json()["validationErrors"][0]
    assert error["keyword"] == "enum" and error["dataPath"] == ".theme"
    assert error["params"] == {"allowedValues": ["mode_black", "mode_white"]}
