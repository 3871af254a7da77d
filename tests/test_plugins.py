"""Plug-in definitions: /api/admin/plugins and /api/plugins."""
import hashlib
import json

import pytest

from models import PluginDefinition, db
from tests.factories import make_plugin
from tests.plugin_helpers import cad_definition, grant, remote_definition

RMT = "rmt-" + hashlib.sha256(b"default:Remote CAD:0.1.0").hexdigest()


def test_post_cad_plugin_then_read_it_back(client, auth_headers, app):
    res = client.post("/api/admin/plugins", json=cad_definition(), headers=auth_headers["alice"])
    assert res.status_code == 201
    assert res.data == b""
    res = client.get("/api/admin/plugins", headers=auth_headers["alice"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 1 and body["page"] == 1
    item = body["items"][0]
    assert item["pluginId"] == "a" * 64
    assert item["runConfiguration"] == {"timeout": 900, "gpus": ""}
    assert item["displayStrategy"][0]["feedbackKey"] == "lesions"
    assert item["createdAt"].endswith("Z")


def test_post_remote_plugin_derives_its_id(client, auth_headers, app):
    body = remote_definition(pluginId="whatever-the-client-says")
    res = client.post("/api/admin/plugins", json=body, headers=auth_headers["alice"])
    assert res.status_code == 201
    with app.app_context():
        plugin = db.session.get(PluginDefinition, RMT)
        assert plugin is not None and plugin.type == "CAD+remote"
    res = client.post("/api/admin/plugins", json=remote_definition(),
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == (
        "The combination of adaptor, pluginName, and version must be unique.")


@pytest.mark.parametrize("key", ["authentication", "authentification"])
def test_both_spellings_of_the_secret_are_accepted(client, auth_headers, key):
    res = client.post("/api/admin/plugins", json=remote_definition(key=key),
                      headers=auth_headers["alice"])
    assert res.status_code == 201


def test_post_without_type(client, auth_headers):
    body = cad_definition()
    del body["type"]
    res = client.post("/api/admin/plugins", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "type is required."


@pytest.mark.parametrize("change", [
    {"pluginId": "sha256:abc"},                    # not an image ID
    {"version": "one"},                            # not semver
    {"runConfiguration": {"timeout": -1}},
    {"runConfiguration": {"memory": "1g"}},        # closed object
    {"icon": {"glyph": "calc"}},                   # incomplete icon
    {"type": "Magic"},
    {"extra": 1},
])
def test_post_invalid_cad_definition(client, auth_headers, change):
    res = client.post("/api/admin/plugins", json=cad_definition(**change),
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_post_incomplete_definitions_are_400_not_500(client, auth_headers):
    body = remote_definition()
    del body["runConfiguration"]
    res = client.post("/api/admin/plugins", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400
    body = cad_definition()
    del body["icon"]
    res = client.post("/api/admin/plugins", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400


def test_post_duplicate_cad(client, auth_headers):
    assert client.post("/api/admin/plugins", json=cad_definition(),
                       headers=auth_headers["alice"]).status_code == 201
    res = client.post("/api/admin/plugins", json=cad_definition(pluginName="Other"),
                      headers=auth_headers["alice"])
    assert res.status_code == 400


@pytest.mark.parametrize("method, path", [
    ("get", "/api/admin/plugins"), ("post", "/api/admin/plugins"),
    ("patch", "/api/admin/plugins/" + "a" * 64)])
def test_admin_plugin_routes_need_manage_server(client, auth_headers, method, path):
    res = getattr(client, method)(path, json=cad_definition(), headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json()["error"] == (
        "You do not have sufficient privilege to access this resource.manageServer")


def test_admin_filter_on_type(client, auth_headers, app):
    with app.app_context():
        make_plugin("b" * 64)
        make_plugin(RMT, type="CAD+remote", run_configuration={"adapter": "default"})
        db.session.commit()
    flt = json.dumps({"type": "CAD+remote"})
    res = client.get("/api/admin/plugins", query_string={"filter": flt},
                     headers=auth_headers["alice"])
    assert [p["pluginId"] for p in res.get_json()["items"]] == [RMT]
    res = client.get("/api/admin/plugins", query_string={"filter": '{"pluginName": "x"}'},
                     headers=auth_headers["alice"])
    assert res.status_code == 400 and res.get_json()["error"] == "Bad filter."
    res = client.get("/api/admin/plugins?unlimited", headers=auth_headers["alice"])
    assert [p["pluginId"] for p in res.get_json()["items"]] == ["b" * 64, RMT]


def test_patch_plugin(client, auth_headers, app):
    client.post("/api/admin/plugins", json=cad_definition(), headers=auth_headers["alice"])
    res = client.patch("/api/admin/plugins/" + "a" * 64,
                       json={"description": "new", "runConfiguration": {"timeout": 60, "gpus": "all"}},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    with app.app_context():
        plugin = db.session.get(PluginDefinition, "a" * 64)
        assert plugin.description == "new"
        assert plugin.run_configuration == {"timeout": 60, "gpus": "all"}


@pytest.mark.parametrize("change, message", [
    ({"version": "not-semver"}, "Request data is not correct."),
    ({"type": "CAD+remote"}, "Request data is not correct."),     # ID no longer fits
    ({"pluginId": "b" * 64}, "The primary key cannot be modified."),
    ({"description": "x" * 129}, "Request data is not correct."),
])
def test_patch_must_leave_a_valid_definition(client, auth_headers, app, change, message):
    client.post("/api/admin/plugins", json=cad_definition(), headers=auth_headers["alice"])
    res = client.patch("/api/admin/plugins/" + "a" * 64, json=change,
                       headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == message
    with app.app_context():
        plugin = db.session.get(PluginDefinition, "a" * 64)
        assert plugin.version == "1.2.3" and plugin.type == "CAD"


def test_patch_unknown_plugin(client, auth_headers):
    res = client.patch("/api/admin/plugins/" + "c" * 64, json={"description": "x"},
                       headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json()["error"] == "The requested plugin/remotePlugin was not found."


def test_user_plugin_list_follows_read_plugin(client, auth_headers, app):
    with app.app_context():
        first = make_plugin("1" * 64, name="First").plugin_id
        second = make_plugin("2" * 64, name="Second").plugin_id
        make_plugin("3" * 64, name="Hidden")
        db.session.commit()
        grant("bob@example.com", second, roles=["readPlugin"])
        grant("bob@example.com", first, roles=["readPlugin", "executePlugin"])
        grant("bob@example.com", "f" * 64, roles=["readPlugin"])  # dangling: skipped
    res = client.get("/api/plugins", headers=auth_headers["bob"])
    assert res.status_code == 200
    assert [p["pluginId"] for p in res.get_json()] == [second, first]
    assert client.get("/api/plugins", headers=auth_headers["guest"]).get_json() == []


def test_get_one_plugin(client, auth_headers, app):
    with app.app_context():
        pid = make_plugin("1" * 64).plugin_id
        db.session.commit()
        grant("bob@example.com", pid, roles=["readPlugin"])
        grant("bob@example.com", "f" * 64, roles=["readPlugin"])
    res = client.get(f"/api/plugins/{pid}", headers=auth_headers["bob"])
    assert res.status_code == 200 and res.get_json()["pluginName"] == "Lung CAD"
    assert "updatedAt" in res.get_json()
    res = client.get(f"/api/plugins/{pid}", headers=auth_headers["guest"])
    assert res.status_code == 401
    assert res.get_json()["error"] == "You do not have permission to get this plugin."
    res = client.get("/api/plugins/" + "f" * 64, headers=auth_headers["bob"])
    assert res.status_code == 404


def test_remote_secret_is_hidden_from_users(client, auth_headers, app):
    client.post("/api/admin/plugins", json=remote_definition(secret="topsecret"),
                headers=auth_headers["alice"])
    with app.app_context():
        grant("bob@example.com", RMT, roles=["readPlugin"])
    res = client.get(f"/api/plugins/{RMT}", headers=auth_headers["bob"])
    assert res.status_code == 200
    assert "topsecret" not in res.get_data(as_text=True)
    assert res.get_json()["runConfiguration"]["parameters"]["endpoint"] == "http://127.0.0.1:9/"
    assert "topsecret" not in client.get("/api/plugins", headers=auth_headers["bob"]).get_data(
        as_text=True)
