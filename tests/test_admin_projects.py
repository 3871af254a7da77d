"""Administration of projects (/api/admin/projects) and GET /api/projects/<id>."""
import pytest

from models import Project, db
from tests.case_helpers import create_case, seed_series
from tests.factories import make_group, make_project, make_token, make_user

MANAGE_SERVER = "You do not have sufficient privilege to access this resource.manageServer"
NEW_PROJECT = {
    "projectName": "Lung", "description": "Lung nodules",
    "icon": {"glyph": "lung-icon", "color": "#ffffff", "backgroundColor": "#008800"},
    "tags": [{"name": "urgent", "color": "#ff0000"}],
    "caseAttributesSchema": {"type": "object", "properties": {
        "grade": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["grade"]},
    "labelAttributesSchema": {},
    "windowPresets": [{"label": "lung", "level": -600, "width": 1500}],
    "windowPriority": "preset,auto",
}


def test_needs_manage_server(client, auth_headers):
    for method, path, body in [("get", "/api/admin/projects", None),
                               ("get", "/api/admin/projects/whatever", None),
                               ("patch", "/api/admin/projects/whatever", {"projectName": "x"}),
                               ("post", "/api/admin/projects", NEW_PROJECT)]:
        res = getattr(client, method)(path, json=body, headers=auth_headers["bob"])
        assert (res.status_code, res.get_json()) == (401, {"error": MANAGE_SERVER}), (method, path)


def test_create_and_get_project(client, auth_headers):
    res = client.post("/api/admin/projects", json=NEW_PROJECT, headers=auth_headers["alice"])
    assert res.status_code == 201
    project_id = res.get_json()["projectId"]
    assert len(project_id) == 26 and project_id == project_id.lower()
    doc = client.get(f"/api/admin/projects/{project_id}", headers=auth_headers["alice"]).get_json()
    assert doc == {**NEW_PROJECT, "projectId": project_id, "createdAt": doc["createdAt"],
                   "updatedAt": doc["updatedAt"]}


def test_create_project_refuses_id(client, auth_headers):
    res = client.post("/api/admin/projects", json={**NEW_PROJECT, "projectId": "mine"},
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Project ID cannot be specified"}


def test_create_project_bad_body(app, client, auth_headers):
    changes = [
        {"projectName": None},
        {"projectName": "x" * 65},
        {"description": "x" * 1025},
        {"icon": {"glyph": "Not Kebab", "color": "#ffffff", "backgroundColor": "#000000"}},
        {"icon": {"glyph": "calc", "color": "white", "backgroundColor": "#000000"}},
        {"icon": {"glyph": "calc", "color": "#ffffff"}},
        {"tags": [{"name": "x", "color": "#FF0000"}]},
        {"tags": [{"name": "x"}]},
        {"tags": [{"name": 1, "color": "#ff0000"}]},
        {"tags": [{"label": "x", "color": "#ff0000"}]},
        {"tags": ["x"]},
        {"windowPriority": "random"},
        {"windowPresets": [{"label": "a", "level": 1}]},
        {"caseAttributesSchema": {"type": "array"}},
        {"caseAttributesSchema": {"properties": {"a": {"type": "object"}}}},
        {"owner": "me"},
    ]
    for change in changes:
        body = {k: v for k, v in {**NEW_PROJECT, **change}.items() if v is not None}
        res = client.post("/api/admin/projects", json=body, headers=auth_headers["alice"])
        assert res.status_code == 400, change
        assert res.get_json()["error"] == "Request data is not correct."
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(Project)).scalar() == 1


def test_list_projects(app, client, auth_headers, default_project):
    for name in ("a", "b"):
        client.post("/api/admin/projects", json={**NEW_PROJECT, "projectName": name},
                    headers=auth_headers["alice"])
    res = client.get("/api/admin/projects", headers=auth_headers["alice"]).get_json()
    assert res["totalItems"] == 3
    assert [p["projectName"] for p in res["items"]] == ["b", "a", "default"]  # updatedAt desc
    res = client.get("/api/admin/projects?unlimited", headers=auth_headers["alice"]).get_json()
    assert len(res["items"]) == 3
    res = client.get('/api/admin/projects?sort={"projectName":1}&limit=1&page=3',
                     headers=auth_headers["alice"]).get_json()
    assert [p["projectName"] for p in res["items"]] == ["default"]


def test_patch_project(app, client, auth_headers, default_project):
    res = client.patch(f"/api/admin/projects/{default_project}", headers=auth_headers["alice"],
                       json={"description": "changed", "tags": []})
    assert res.status_code == 204
    with app.app_context():
        project = db.session.get(Project, default_project)
        assert project.description == "changed" and project.project_name == "default"


def test_project_tags_as_the_ui_sends_them(app, client, auth_headers, default_project):
    """API.md 4.8: the UI's {name, color}, a legacy caption, or neither; handed back as
    stored; case tags are the names."""
    palette = [{"name": "urgent", "color": "#ff0000"}, {"caption": "legacy", "color": "#00ff00"},
               {"name": "both", "caption": "old", "color": "#0000ff"}, {"color": "#123456"}]
    headers = auth_headers["alice"]
    res = client.patch(f"/api/admin/projects/{default_project}", json={"tags": palette},
                       headers=headers)
    assert res.status_code == 204
    for path in (f"/api/admin/projects/{default_project}", f"/api/projects/{default_project}"):
        assert client.get(path, headers=headers).get_json()["tags"] == palette
    [project] = client.get("/api/login-info/full", headers=headers).get_json()["accessibleProjects"]
    assert project["project"]["tags"] == palette

    seed_series(app)
    case_id = create_case(client, headers, default_project, tags=["urgent"])
    res = client.put(f"/api/cases/{case_id}/tags", json=["urgent", "both"], headers=headers)
    assert res.status_code == 204
    res = client.patch("/api/cases/tags", json={"operation": "add", "tags": ["legacy"],
                                                "caseIds": [case_id]}, headers=headers)
    assert res.status_code == 204
    assert client.get(f"/api/cases/{case_id}", headers=headers).get_json()["tags"] == [
        "urgent", "both", "legacy"]
    found = client.get('/api/cases?filter={"tags": "both"}', headers=headers).get_json()
    assert [c["caseId"] for c in found["items"]] == [case_id]


@pytest.mark.parametrize("body, status, message", [
    ({"projectId": "x"}, 400, "The primary key cannot be modified."),
    ({"windowPriority": "x"}, 400, "Request data is not correct."),
])
def test_patch_project_refusals(client, auth_headers, default_project, body, status, message):
    res = client.patch(f"/api/admin/projects/{default_project}", json=body,
                       headers=auth_headers["alice"])
    assert res.status_code == status
    assert res.get_json()["error"] == message


def test_unknown_project(client, auth_headers):
    res = client.get("/api/admin/projects/nope", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested project was not found."}
    res = client.patch("/api/admin/projects/nope", json={"description": "x"},
                       headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The request resource was not found."}


# --- GET /api/projects/<id> --------------------------------------------------------------

def test_member_reads_project(client, auth_headers, default_project):
    res = client.get(f"/api/projects/{default_project}", headers=auth_headers["bob"])
    assert res.status_code == 200
    doc = res.get_json()
    assert doc["projectId"] == default_project and doc["projectName"] == "default"
    assert "createdAt" in doc and "updatedAt" in doc


def test_read_role_needed(app, client, auth_headers):
    with app.app_context():
        other = make_project("secret").project_id
        db.session.commit()
    res = client.get(f"/api/projects/{other}", headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "read" privilege of this project.'}
    # even the server manager needs the project role
    assert client.get(f"/api/projects/{other}", headers=auth_headers["alice"]).status_code == 401


def test_unknown_project_is_401(client, auth_headers):
    res = client.get("/api/projects/does-not-exist", headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "read" privilege of this project.'}


def test_deleted_project_still_named_by_group_is_401(app, client):
    with app.app_context():
        group = make_group("ghost readers", read_projects=["gone"])
        make_user("carol@example.com", "carol", groups=[group.group_id])
        token = make_token("carol@example.com")
    res = client.get("/api/projects/gone", headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 401
