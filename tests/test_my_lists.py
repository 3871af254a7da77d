"""My lists: /api/mylists and their items."""
import pytest
from sqlalchemy import event

from models import MyListEditor, db
from tests.case_helpers import UID1, UID2, create_case, persona, seed_series
from tests.factories import make_series


def new_list(client, headers, resource_type="series", public=False, name="my list"):
    res = client.post("/api/mylists", headers=headers,
                      json={"name": name, "resourceType": resource_type, "public": public})
    assert res.status_code == 201, res.get_json()
    return res.get_json()["myListId"]


def patch_items(client, headers, list_id, operation, ids):
    return client.patch(f"/api/mylists/{list_id}/items", headers=headers,
                        json={"operation": operation, "resourceIds": ids})


@pytest.fixture
def series(app):
    seed_series(app)


def test_create_list_and_read_it(client, auth_headers):
    list_id = new_list(client, auth_headers["bob"], "clinicalCases", name="To check")
    assert len(list_id) == 26
    res = client.get("/api/mylists", headers=auth_headers["bob"])
    assert res.status_code == 200
    (header,) = res.get_json()
    assert header == {"myListId": list_id, "resourceType": "clinicalCases", "name": "To check",
                      "public": False, "editors": [], "createdAt": header["createdAt"]}
    res = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"])
    assert res.get_json() == {**header, "resourceIds": []}
    assert client.get("/api/mylists", headers=auth_headers["alice"]).get_json() == []


@pytest.mark.parametrize("body", [
    {"name": "", "resourceType": "series", "public": False},
    {"name": "x" * 65, "resourceType": "series", "public": False},
    {"name": "x", "resourceType": "tasks", "public": False},
    {"name": "x", "resourceType": "series"},
    {"name": "x", "resourceType": "series", "public": False, "extra": 1},
])
def test_create_list_validation(client, auth_headers, body):
    res = client.post("/api/mylists", headers=auth_headers["bob"], json=body)
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_items_add_remove_in_order(client, auth_headers, series):
    list_id = new_list(client, auth_headers["bob"])
    res = patch_items(client, auth_headers["bob"], list_id, "add", [UID2, UID1, UID2])
    assert res.status_code == 200
    assert res.get_json() == {"changedCount": 2}
    assert patch_items(client, auth_headers["bob"], list_id, "add", [UID1]).get_json() == {
        "changedCount": 0}
    doc = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).get_json()
    assert doc["resourceIds"] == [UID2, UID1]
    res = patch_items(client, auth_headers["bob"], list_id, "remove", [UID2, "9.9.9"])
    assert res.get_json() == {"changedCount": 1}
    doc = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).get_json()
    assert doc["resourceIds"] == [UID1]


def test_item_of_the_wrong_resource_type_is_404(app, client, auth_headers, default_project,
                                                series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    series_list = new_list(client, auth_headers["bob"], "series")
    res = patch_items(client, auth_headers["bob"], series_list, "add", [UID1, case_id])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested series was not found."}
    case_list = new_list(client, auth_headers["bob"], "clinicalCases")
    res = patch_items(client, auth_headers["bob"], case_list, "add", [UID1])
    assert res.get_json() == {"error": "The requested clinicalCase was not found."}
    job_list = new_list(client, auth_headers["bob"], "pluginJobs")
    res = patch_items(client, auth_headers["bob"], job_list, "add", [case_id])
    assert res.get_json() == {"error": "The requested pluginJob was not found."}
    # Nothing was added by the refused requests.
    doc = client.get(f"/api/mylists/{series_list}", headers=auth_headers["bob"]).get_json()
    assert doc["resourceIds"] == []
    assert patch_items(client, auth_headers["bob"], case_list, "add", [case_id]).get_json() == {
        "changedCount": 1}


def test_existence_is_checked_in_one_query(app, client, auth_headers):
    uids = [f"1.2.3.{i}" for i in range(50)]
    with app.app_context():
        for uid in uids:
            make_series(uid)
        db.session.commit()
    list_id = new_list(client, auth_headers["bob"])
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            res = patch_items(client, auth_headers["bob"], list_id, "add", uids)
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
    assert res.get_json() == {"changedCount": 50}
    series_reads = [s for s in statements if "FROM series" in s]
    assert len(series_reads) == 1


def test_list_cannot_exceed_1000_items(app, client, auth_headers):
    uids = [f"1.2.4.{i}" for i in range(1001)]
    with app.app_context():
        for uid in uids:
            make_series(uid)
        db.session.commit()
    list_id = new_list(client, auth_headers["bob"])
    assert patch_items(client, auth_headers["bob"], list_id, "add", uids[:600]).get_json() == {
        "changedCount": 600}
    res = patch_items(client, auth_headers["bob"], list_id, "add", uids[600:])
    assert res.status_code == 400
    assert res.get_json() == {"error": "The number of items cannot exceed 1000"}
    doc = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).get_json()
    assert len(doc["resourceIds"]) == 600
    res = patch_items(client, auth_headers["bob"], list_id, "add", uids[600:1000])
    assert res.get_json() == {"changedCount": 400}
    res = patch_items(client, auth_headers["bob"], list_id, "add", uids)
    assert res.status_code == 400  # 1001 IDs in one request: refused by the schema


def test_read_access_owner_or_public(client, auth_headers):
    private = new_list(client, auth_headers["bob"])
    public = new_list(client, auth_headers["bob"], public=True)
    res = client.get(f"/api/mylists/{private}", headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot read the items of this my list."}
    assert client.get(f"/api/mylists/{public}", headers=auth_headers["alice"]).status_code == 200
    res = client.get("/api/mylists/nope", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "This my list does not exist"}


def test_patch_list_owner_only_and_editors(app, client, auth_headers, series):
    list_id = new_list(client, auth_headers["bob"])
    res = client.patch(f"/api/mylists/{list_id}", headers=auth_headers["alice"],
                       json={"name": "mine"})
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot edit a my list you do not own"}
    # Without editors, alice cannot edit items either.
    res = patch_items(client, auth_headers["alice"], list_id, "add", [UID1])
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot edit the items of this my list."}

    editor_group = persona(app, "helen@example.com")
    with app.app_context():
        from models import User
        helen_group = db.session.get(User, "helen@example.com").groups[0]
    editors = [{"type": "user", "userEmail": "alice@example.com"},
               {"type": "group", "groupId": helen_group}]
    res = client.patch(f"/api/mylists/{list_id}", headers=auth_headers["bob"],
                       json={"name": "shared", "public": True, "editors": editors})
    assert res.status_code == 204
    doc = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).get_json()
    assert (doc["name"], doc["public"], doc["editors"]) == ("shared", True, editors)
    with app.app_context():
        rows = db.session.execute(db.select(MyListEditor.user_email, MyListEditor.group_id)
                                  .where(MyListEditor.my_list_id == list_id)).all()
        assert sorted(rows, key=str) == sorted([("alice@example.com", None),
                                                (None, helen_group)], key=str)
    assert patch_items(client, auth_headers["alice"], list_id, "add", [UID1]).status_code == 200
    assert patch_items(client, editor_group, list_id, "add", [UID2]).status_code == 200
    # Editors still cannot rename or delete.
    assert client.patch(f"/api/mylists/{list_id}", headers=auth_headers["alice"],
                        json={"public": False}).status_code == 401
    assert client.delete(f"/api/mylists/{list_id}", headers=auth_headers["alice"]).status_code == 401
    res = client.patch(f"/api/mylists/{list_id}", headers=auth_headers["bob"], json={"editors": []})
    assert res.status_code == 204
    with app.app_context():
        assert db.session.execute(db.select(MyListEditor)).first() is None
    assert patch_items(client, auth_headers["alice"], list_id, "remove", [UID1]).status_code == 401


@pytest.mark.parametrize("editors, message", [
    ([{"type": "user", "userEmail": "nobody@example.com"}], "Invalid email address is included"),
    ([{"type": "group", "groupId": 999}], "Invalid group ID is included"),
    ([{"type": "group", "groupId": 1.5}], "Invalid group ID is included"),
])
def test_patch_list_unknown_editors(client, auth_headers, editors, message):
    list_id = new_list(client, auth_headers["bob"])
    res = client.patch(f"/api/mylists/{list_id}", headers=auth_headers["bob"],
                       json={"editors": editors})
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"editors": [{"type": "user"}]},
                                  {"myListId": "x"}])
def test_patch_list_validation(client, auth_headers, body):
    list_id = new_list(client, auth_headers["bob"])
    res = client.patch(f"/api/mylists/{list_id}", headers=auth_headers["bob"], json=body)
    assert res.status_code == 400


def test_delete_list(client, auth_headers, series):
    list_id = new_list(client, auth_headers["bob"])
    patch_items(client, auth_headers["bob"], list_id, "add", [UID1])
    res = client.delete(f"/api/mylists/{list_id}", headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot delete a my list you do not own"}
    assert client.delete(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).status_code == 204
    assert client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).status_code == 404
    assert client.get("/api/mylists", headers=auth_headers["bob"]).get_json() == []
    assert client.delete(f"/api/mylists/{list_id}", headers=auth_headers["bob"]).status_code == 404


def test_items_patch_validation(client, auth_headers):
    list_id = new_list(client, auth_headers["bob"])
    for body in ({"operation": "add", "resourceIds": []}, {"operation": "move", "resourceIds": ["1"]},
                 {"operation": "add"}):
        res = client.patch(f"/api/mylists/{list_id}/items", headers=auth_headers["bob"], json=body)
        assert res.status_code == 400
    res = patch_items(client, auth_headers["bob"], "nope", "add", ["1"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "This my list does not exist"}


def test_my_lists_need_a_token(client):
    assert client.get("/api/mylists").status_code == 401


# --- GET /api/series/list/<id> ----------------------------------------------------------

def test_series_list_search(app, client, auth_headers, series):
    from tests.case_helpers import UID_OTHER_DOMAIN
    list_id = new_list(client, auth_headers["bob"])
    for uid in (UID1, UID_OTHER_DOMAIN, UID2):  # one request each: distinct addedToListAt
        assert patch_items(client, auth_headers["bob"], list_id, "add", [uid]).status_code == 200
    res = client.get(f"/api/series/list/{list_id}", headers=auth_headers["bob"])
    assert res.status_code == 200
    body = res.get_json()
    # The sirius series silently disappears (bob's domains); newest addition first.
    assert [s["seriesUid"] for s in body["items"]] == [UID2, UID1]
    assert body["totalItems"] == 2 and body["page"] == 1
    assert body["items"][0]["patientInfo"]["patientName"] == "Koume"
    assert "addedToListAt" not in body["items"][0]
    res = client.get(f"/api/series/list/{list_id}", headers=auth_headers["bob"],
                     query_string={"sort": '{"addedToListAt": 1}',
                                   "filter": '{"patientInfo.sex": "F"}'})
    assert [s["seriesUid"] for s in res.get_json()["items"]] == [UID1]


def test_series_list_search_masks_patient_info(app, client, auth_headers, series):
    hidden = persona(app, "ivy@example.com", privileges=["personalInfoView"],
                     preferences={"personalInfoView": False})
    list_id = new_list(client, hidden)
    patch_items(client, hidden, list_id, "add", [UID1])
    (item,) = client.get(f"/api/series/list/{list_id}", headers=hidden).get_json()["items"]
    assert "patientInfo" not in item


def test_series_list_search_refusals(app, client, auth_headers, series):
    case_list = new_list(client, auth_headers["bob"], "clinicalCases")
    res = client.get(f"/api/series/list/{case_list}", headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "This my list is not for series"}
    res = client.get("/api/series/list/nope", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "This my list does not exist"}
    private = new_list(client, auth_headers["alice"])
    patch_items(client, auth_headers["alice"], private, "add", [UID1])
    res = client.get(f"/api/series/list/{private}", headers=auth_headers["bob"])
    assert res.status_code == 404
    public = new_list(client, auth_headers["alice"], public=True)
    patch_items(client, auth_headers["alice"], public, "add", [UID1])
    res = client.get(f"/api/series/list/{public}", headers=auth_headers["bob"])
    assert [s["seriesUid"] for s in res.get_json()["items"]] == [UID1]
