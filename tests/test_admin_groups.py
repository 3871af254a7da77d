"""Administration of groups: /api/admin/groups, /api/admin/global-privileges."""
import pytest

from models import Group, db

MANAGE_SERVER = "You do not have sufficient privilege to access this resource.manageServer"
EMPTY_GROUP = {"groupName": "new", "privileges": [], "domains": [], "readProjects": [],
               "writeProjects": [], "addSeriesProjects": [], "viewPersonalInfoProjects": [],
               "moderateProjects": [], "readPlugin": [], "executePlugin": [], "manageJobs": [],
               "inputPersonalFeedback": [], "inputConsensualFeedback": [], "manageFeedback": [],
               "viewPersonalInfo": []}


DENIALS = [
    ("get", "/api/admin/groups", None),
    ("get", "/api/admin/groups/1", None),
    ("patch", "/api/admin/groups/1", {"groupName": "x"}),
    ("patch", "/api/admin/groups/1", {"nonsense": 1}),  # privilege before body validation
    ("post", "/api/admin/groups", EMPTY_GROUP),
    ("get", "/api/admin/global-privileges", None),
]


def test_needs_manage_server(app, client, auth_headers):
    for who in ("bob", "guest"):
        for method, path, body in DENIALS:
            res = getattr(client, method)(path, json=body, headers=auth_headers[who])
            assert (res.status_code, res.get_json()) == (401, {"error": MANAGE_SERVER}), \
                (who, method, path)
    with app.app_context():
        assert db.session.get(Group, 1).group_name == "admin"
        assert db.session.execute(db.select(db.func.count()).select_from(Group)).scalar() == 4


def test_needs_token(client):
    assert client.get("/api/admin/groups").status_code == 401


def test_list_groups(client, auth_headers):
    res = client.get("/api/admin/groups", headers=auth_headers["alice"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 4 and body["page"] == 1
    assert [g["groupId"] for g in body["items"]] == [1, 2, 3, 4]
    assert body["items"][0]["groupName"] == "admin"
    assert set(body["items"][0]) == {"groupId", "groupName", "createdAt", "updatedAt",
                                     *EMPTY_GROUP}


def test_list_groups_unlimited_and_sort(app, client, auth_headers):
    with app.app_context():
        for i in range(25):
            db.session.add(Group(group_name=f"g{i:02d}"))
        db.session.commit()
    headers = auth_headers["alice"]
    assert len(client.get("/api/admin/groups", headers=headers).get_json()["items"]) == 20
    res = client.get("/api/admin/groups?unlimited=1", headers=headers).get_json()
    assert len(res["items"]) == 29 and res["totalItems"] == 29
    # unlimited endpoints accept a limit above 200
    assert client.get("/api/admin/groups?limit=500", headers=headers).status_code == 200
    res = client.get('/api/admin/groups?sort={"groupId":-1}&limit=2', headers=headers).get_json()
    assert [g["groupId"] for g in res["items"]] == [29, 28]
    # the filter is ignored, as in CIRCUS
    res = client.get('/api/admin/groups?filter={"groupName":"admin"}', headers=headers)
    assert res.get_json()["totalItems"] == 29


def test_get_group(client, auth_headers):
    res = client.get("/api/admin/groups/1", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.get_json()["groupName"] == "admin"
    assert "manageServer" in res.get_json()["privileges"]


@pytest.mark.parametrize("group_id", ["999", "abc"])
def test_get_unknown_group(client, auth_headers, group_id):
    res = client.get(f"/api/admin/groups/{group_id}", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested group was not found."}


def test_create_group(app, client, auth_headers):
    body = {**EMPTY_GROUP, "privileges": ["downloadVolume"], "readProjects": ["p1"],
            "writeProjects": ["p1"]}
    res = client.post("/api/admin/groups", json=body, headers=auth_headers["alice"])
    assert res.status_code == 201
    assert res.get_json() == {"groupId": 5}
    doc = client.get("/api/admin/groups/5", headers=auth_headers["alice"]).get_json()
    assert doc["privileges"] == ["downloadVolume"] and doc["writeProjects"] == ["p1"]
    res = client.post("/api/admin/groups", json=EMPTY_GROUP, headers=auth_headers["alice"])
    assert res.get_json() == {"groupId": 6}


def test_create_group_refuses_id(client, auth_headers):
    res = client.post("/api/admin/groups", json={**EMPTY_GROUP, "groupId": 77},
                      headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Group ID cannot be specified"}


def test_create_group_bad_body(client, auth_headers):
    changes = [{"groupName": None},  # missing field
               {"privileges": ["fly"]}, {"domains": "default"}, {"extra": 1}]
    for change in changes:
        body = {k: v for k, v in {**EMPTY_GROUP, **change}.items() if v is not None}
        res = client.post("/api/admin/groups", json=body, headers=auth_headers["alice"])
        assert res.status_code == 400, change
        assert res.get_json()["error"] == "Request data is not correct."
        assert res.get_json()["validationErrors"]


def test_patch_group(app, client, auth_headers):
    res = client.patch("/api/admin/groups/2", headers=auth_headers["alice"],
                       json={"groupName": "users", "domains": ["default", "sirius.org"]})
    assert res.status_code == 204 and res.data == b""
    doc = client.get("/api/admin/groups/2", headers=auth_headers["alice"]).get_json()
    assert doc["groupName"] == "users" and doc["domains"] == ["default", "sirius.org"]
    assert doc["privileges"] == ["personalInfoView"]  # untouched


@pytest.mark.parametrize("body, message", [
    ({"writeProjects": ["a", "b"], "readProjects": ["b"]},
     "All items with writeProjects must have readProjects. Inconsistent IDs: a"),
    ({"moderateProjects": ["x", "y"]},
     "All items with moderateProjects must have readProjects. Inconsistent IDs: x, y"),
    ({"manageFeedback": ["p"], "readPlugin": []},
     "All items with manageFeedback must have readPlugin. Inconsistent IDs: p"),
    ({"viewPersonalInfo": ["q"]},
     "All items with viewPersonalInfo must have readPlugin. Inconsistent IDs: q"),
])
def test_patch_group_consistency(client, auth_headers, body, message):
    res = client.patch("/api/admin/groups/2", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


def test_patch_group_consistent_body(client, auth_headers):
    body = {"readPlugin": ["p"], "executePlugin": ["p"], "manageJobs": ["p"]}
    res = client.patch("/api/admin/groups/2", json=body, headers=auth_headers["alice"])
    assert res.status_code == 204


def test_patch_group_primary_key(client, auth_headers):
    res = client.patch("/api/admin/groups/2", json={"groupId": 3},
                       headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "The primary key cannot be modified."}


def test_patch_unknown_group(client, auth_headers):
    res = client.patch("/api/admin/groups/999", json={"groupName": "x"},
                       headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The request resource was not found."}


def test_patch_group_bad_body(client, auth_headers):
    res = client.patch("/api/admin/groups/2", json={"readProjects": [1]},
                       headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_patch_group_changes_privileges_at_once(client, auth_headers):
    """Privileges are recomputed per request: granting manageServer works immediately."""
    assert client.get("/api/admin/groups", headers=auth_headers["bob"]).status_code == 401
    res = client.patch("/api/admin/groups/4", json={"privileges": ["manageServer"]},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert client.get("/api/admin/groups", headers=auth_headers["bob"]).status_code == 200


def test_global_privileges(client, auth_headers):
    res = client.get("/api/admin/global-privileges", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.get_json() == [
        {"privilege": "createProject", "caption": "Create Project"},
        {"privilege": "deleteProject", "caption": "Delete Project"},
        {"privilege": "manageServer", "caption": "Manage Server"},
        {"privilege": "personalInfoView", "caption": "View Personal Info"},
        {"privilege": "downloadVolume", "caption": "Download Volume as Raw File"},
        {"privilege": "issueOnetime", "caption": "Issue Onetime URL"},
    ]


def test_content_type_checked_before_privilege(client, auth_headers):
    res = client.patch("/api/admin/groups/2", data="{}", headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Content-type is unspecified."}


def test_create_group_applies_consistency_rules(client, auth_headers):
    """CIRCUS forgot the rules on POST (quirk 24); an inconsistent group is refused."""
    body = {**EMPTY_GROUP, "executePlugin": ["p"]}
    res = client.post("/api/admin/groups", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {
        "error": "All items with executePlugin must have readPlugin. Inconsistent IDs: p"}
