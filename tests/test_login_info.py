"""Who am I: /api/login-info and /api/login-info/full."""
from datetime import datetime

import pytest

import config
from models import MyList, MyListEditor, PluginDefinition, ServerParam, db
from tests.factories import make_group, make_project, make_token, make_user

PLUGIN_ID = "a" * 64


def _plugin():
    return PluginDefinition(plugin_id=PLUGIN_ID, type="CAD", plugin_name="MRA-CAD",
                            version="1.0.0", description="finds aneurysms",
                            run_configuration={"timeout": 900, "gpus": ""},
                            icon={"glyph": "calc", "color": "#ffffff",
                                  "backgroundColor": "#008800"},
                            display_strategy=[])


def test_login_info(client, auth_headers):
    res = client.get("/api/login-info", headers=auth_headers["bob"])
    assert res.get_json() == {"userEmail": "bob@example.com", "loginId": "bob"}


def test_full_needs_token(client):
    res = client.get("/api/login-info/full")
    assert res.status_code == 401


def test_full_for_bob(app, client, auth_headers, default_project):
    res = client.get("/api/login-info/full", headers=auth_headers["bob"])
    assert res.status_code == 200
    doc = res.get_json()
    assert "password" not in doc
    assert doc["userEmail"] == "bob@example.com" and doc["loginId"] == "bob"
    assert doc["groups"] == ["power users"]
    assert doc["domains"] == ["default"]
    assert doc["globalPrivileges"] == ["personalInfoView"]
    assert doc["preferences"] == {"personalInfoView": True}  # raw, not merged with defaults
    assert doc["myLists"] == [] and doc["sharedMyLists"] == []
    assert doc["accessiblePlugins"] == []
    [project] = doc["accessibleProjects"]
    assert project["projectId"] == default_project
    assert project["roles"] == ["read", "write", "viewPersonalInfo"]
    assert project["project"]["projectName"] == "default"
    assert project["project"]["icon"] == {"glyph": "calc", "color": "#ffffcc",
                                          "backgroundColor": "#248065"}
    assert doc["defaultDomain"] is None
    assert doc["dicomImageServer"] == "http://localhost/rs"  # this server, as addressed
    assert doc["uploadFileMax"] == 30
    assert doc["uploadFileSizeMaxBytes"] == 209715200
    assert set(doc) == {
        "userEmail", "loginId", "description", "loginEnabled", "lastLoginTime", "lastLoginIp",
        "preferences", "myLists", "createdAt", "updatedAt", "groups", "domains",
        "globalPrivileges", "accessibleProjects", "accessiblePlugins", "defaultDomain",
        "sharedMyLists", "dicomImageServer", "uploadFileMax", "uploadFileSizeMaxBytes"}


def test_full_for_guest(client, auth_headers):
    doc = client.get("/api/login-info/full", headers=auth_headers["guest"]).get_json()
    assert doc["groups"] == [] and doc["domains"] == [] and doc["globalPrivileges"] == []
    assert doc["accessibleProjects"] == [] and doc["accessiblePlugins"] == []


def test_default_domain_only_if_accessible(app, client, auth_headers):
    with app.app_context():
        db.session.add(ServerParam(key="defaultDomain", value="default"))
        db.session.commit()
    assert client.get("/api/login-info/full",
                      headers=auth_headers["bob"]).get_json()["defaultDomain"] == "default"
    assert client.get("/api/login-info/full",
                      headers=auth_headers["guest"]).get_json()["defaultDomain"] is None


def test_plugins_projects_and_roles(app, client):
    with app.app_context():
        db.session.add(_plugin())
        p1 = make_project("one").project_id
        p2 = make_project("two").project_id
        first = make_group("first", privileges=["downloadVolume"], domains=["x"],
                           read_projects=[p1], moderate_projects=[p1],
                           read_plugin=[PLUGIN_ID], view_personal_info=[PLUGIN_ID])
        second = make_group("second", privileges=["downloadVolume", "personalInfoView"],
                            domains=["y", "x"], read_projects=[p2, "deleted-project"],
                            write_projects=[p1], read_plugin=["deleted-plugin"],
                            execute_plugin=[PLUGIN_ID])
        make_user("carol@example.com", "carol", groups=[first.group_id, second.group_id],
                  last_login_ip="10.0.0.5", last_login_time=datetime(2024, 1, 5, 1))
        token = make_token("carol@example.com")
    doc = client.get("/api/login-info/full",
                     headers={"Authorization": f"Bearer {token}"}).get_json()
    assert doc["groups"] == ["first", "second"]
    assert doc["domains"] == ["x", "y"]
    assert doc["globalPrivileges"] == ["downloadVolume", "personalInfoView"]
    assert doc["lastLoginIp"] == "10.0.0.5"
    assert doc["lastLoginTime"] == "2024-01-05T01:00:00.000Z"
    projects = {p["projectId"]: p for p in doc["accessibleProjects"]}
    assert set(projects) == {p1, p2}  # the deleted project is skipped
    assert projects[p1]["roles"] == ["read", "write", "moderate"]
    assert projects[p2]["roles"] == ["read"]
    assert projects[p2]["project"]["projectName"] == "two"
    [plugin] = doc["accessiblePlugins"]  # the deleted plug-in is skipped
    assert plugin["pluginId"] == PLUGIN_ID
    assert plugin["roles"] == ["readPlugin", "executePlugin", "viewPersonalInfo"]
    assert plugin["plugin"]["pluginName"] == "MRA-CAD"
    assert plugin["plugin"]["runConfiguration"] == {"timeout": 900, "gpus": ""}
    assert "createdAt" in plugin["plugin"]


def test_my_lists_and_shared_lists(app, client, auth_headers, tokens):
    with app.app_context():
        group = make_group("reviewers")
        make_user("dave@example.com", "dave", groups=[4, group.group_id])
        own = MyList(my_list_id="01own", user_email="dave@example.com",
                     resource_type="clinicalCases", name="To check", public=False, editors=[],
                     created_at=datetime(2021, 1, 1))
        by_user = MyList(my_list_id="01byuser", user_email="bob@example.com",
                         resource_type="series", name="Bob's", public=True,
                         editors=[{"type": "user", "userEmail": "dave@example.com"}],
                         created_at=datetime(2021, 1, 2))
        by_group = MyList(my_list_id="01bygroup", user_email="alice@example.com",
                          resource_type="pluginJobs", name="Alice's", public=False,
                          editors=[{"type": "group", "groupId": group.group_id},
                                   {"type": "user", "userEmail": "dave@example.com"}],
                          created_at=datetime(2021, 1, 3))
        not_shared = MyList(my_list_id="01private", user_email="alice@example.com",
                            resource_type="series", name="Mine", public=False,
                            editors=[{"type": "user", "userEmail": "bob@example.com"}],
                            created_at=datetime(2021, 1, 4))
        db.session.add_all([own, by_user, by_group, not_shared])
        db.session.flush()
        db.session.add_all([
            MyListEditor(my_list_id="01byuser", user_email="dave@example.com"),
            MyListEditor(my_list_id="01bygroup", group_id=group.group_id),
            MyListEditor(my_list_id="01bygroup", user_email="dave@example.com"),
            MyListEditor(my_list_id="01private", user_email="bob@example.com")])
        token = make_token("dave@example.com")
    doc = client.get("/api/login-info/full",
                     headers={"Authorization": f"Bearer {token}"}).get_json()
    assert doc["myLists"] == [{"myListId": "01own", "resourceType": "clinicalCases",
                               "name": "To check", "public": False, "editors": [],
                               "createdAt": "2021-01-01T00:00:00.000Z"}]
    assert [(s["owner"], s["sharedMyList"]["myListId"]) for s in doc["sharedMyLists"]] == [
        ("bob@example.com", "01byuser"), ("alice@example.com", "01bygroup")]
    assert doc["sharedMyLists"][0]["sharedMyList"]["editors"] == [
        {"type": "user", "userEmail": "dave@example.com"}]
    # bob sees only the list shared with him
    doc = client.get("/api/login-info/full", headers=auth_headers["bob"]).get_json()
    assert [s["sharedMyList"]["myListId"] for s in doc["sharedMyLists"]] == ["01private"]
    assert [m["myListId"] for m in doc["myLists"]] == ["01byuser"]


def test_remote_plugin_secret_is_not_shown(app):
    remote_id = "rmt-" + "b" * 64
    with app.app_context():
        db.session.add(PluginDefinition(
            plugin_id=remote_id, type="CAD+remote", plugin_name="remote", version="1.0.0",
            description="", icon={"glyph": "calc", "color": "#ffffff",
                                  "backgroundColor": "#008800"}, display_strategy=[],
            run_configuration={"adapter": "x", "parameters": {
                "endpoint": "https://cad.example.com", "authentication": "s3cret"}}))
        group = make_group("remote users", read_plugin=[remote_id])
        make_user("carol@example.com", "carol", groups=[group.group_id])
        token = make_token("carol@example.com")
    res = app.test_client().get("/api/login-info/full",
                                headers={"Authorization": f"Bearer {token}"})
    [plugin] = res.get_json()["accessiblePlugins"]
    assert plugin["plugin"]["runConfiguration"] == {
        "adapter": "x", "parameters": {"endpoint": "https://cad.example.com"}}
    assert b"s3cret" not in res.data


# --- dicomImageServer ------------------------------------------------------------------------

FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "circus.example.org",
             "X-Forwarded-For": "203.0.113.9"}


def image_server(client, headers, base_url="http://localhost", **extra):
    res = client.get("/api/login-info/full", base_url=base_url, headers={**headers, **extra})
    assert res.status_code == 200
    return res.get_json()["dicomImageServer"]


@pytest.mark.parametrize("base_url, expected", [
    ("http://localhost", "http://localhost/rs"),
    ("http://10.0.0.5:9000", "http://10.0.0.5:9000/rs"),
    ("https://circus.example.org", "https://circus.example.org/rs"),
    ("https://circus.example.org:8443", "https://circus.example.org:8443/rs"),
])
def test_image_server_is_this_server_as_the_browser_addressed_it(client, auth_headers,
                                                                  base_url, expected):
    assert image_server(client, auth_headers["bob"], base_url) == expected


def test_forwarded_headers_are_ignored_unless_trusted(client, auth_headers):
    assert image_server(client, auth_headers["bob"], "http://10.0.0.5:8080",
                        **FORWARDED) == "http://10.0.0.5:8080/rs"


@pytest.mark.parametrize("app_config", [{"TRUST_FORWARDED_HEADERS": True}])
def test_forwarded_headers_when_trusted(client, auth_headers):
    assert image_server(client, auth_headers["bob"], "http://10.0.0.5:8080",
                        **FORWARDED) == "https://circus.example.org/rs"
    assert image_server(client, auth_headers["bob"], "http://10.0.0.5:8080") == \
        "http://10.0.0.5:8080/rs"


@pytest.mark.parametrize("app_config", [
    {"DICOM_IMAGE_SERVER_URL": "https://images.example.org/rs"}])
def test_configured_image_server_wins(client, auth_headers):
    assert image_server(client, auth_headers["bob"], "http://10.0.0.5:8080",
                        **FORWARDED) == "https://images.example.org/rs"


def test_image_server_setting_defaults_to_unset(monkeypatch):
    monkeypatch.delenv("CIRCUS_DICOM_IMAGE_SERVER_URL", raising=False)
    assert config.from_environment()["DICOM_IMAGE_SERVER_URL"] is None
    monkeypatch.setenv("CIRCUS_DICOM_IMAGE_SERVER_URL", "http://x/rs")
    assert config.from_environment()["DICOM_IMAGE_SERVER_URL"] == "http://x/rs"
