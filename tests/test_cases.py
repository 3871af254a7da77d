"""Cases: POST/GET /api/cases, GET /api/cases/<id>, tags, deletion, list search."""
import json

import pytest

from models import CaseSeries, CaseTag, ClinicalCase, MyListItem, Series, db
from tests.case_helpers import (UID1, UID2, UID_OTHER_DOMAIN, create_case, import_shared_series,
                                persona, pvd, revision, seed_series)
from tests.factories import make_project


@pytest.fixture
def series(app):
    seed_series(app)


def entry(uid=UID1, descriptor=None):
    return {"seriesUid": uid, "partialVolumeDescriptor": descriptor or pvd()}


def search(client, headers, path="/api/cases", **params):
    query = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in params.items()}
    res = client.get(path, query_string=query, headers=headers)
    return res


# --- POST /api/cases ----------------------------------------------------------------------

def test_create_case_and_get_it(client, auth_headers, default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project,
                          [entry(UID1, pvd(10, 1, -1)), entry(UID2, pvd(1, 5))], ["urgent"])
    res = client.get(f"/api/cases/{case_id}", headers=auth_headers["bob"])
    assert res.status_code == 200
    doc = res.get_json()
    assert set(doc) == {"caseId", "projectId", "tags", "revisions", "domains",
                        "createdAt", "updatedAt"}
    assert doc["caseId"] == case_id and len(case_id) == 26 and case_id == case_id.lower()
    assert doc["projectId"] == default_project
    assert doc["tags"] == ["urgent"]
    assert doc["domains"] == ["default"]
    (rev,) = doc["revisions"]
    assert rev["creator"] == "bob@example.com"
    assert rev["description"] == "Created new case."
    assert rev["attributes"] == {} and rev["status"] == "draft"
    assert rev["date"].endswith("Z")
    assert rev["series"] == [
        {"seriesUid": UID1, "partialVolumeDescriptor": pvd(10, 1, -1), "labels": []},
        {"seriesUid": UID2, "partialVolumeDescriptor": pvd(1, 5), "labels": []}]
    assert res.headers["ETag"] == '"rev-0"'
    with client.application.app_context():
        assert {r.series_uid for r in db.session.execute(
            db.select(CaseSeries).where(CaseSeries.case_id == case_id)).scalars()} == {UID1, UID2}
        assert db.session.get(ClinicalCase, case_id).first_series_uid == UID1


@pytest.mark.parametrize("missing", ["projectId", "series", "tags"])
def test_every_field_is_required(client, auth_headers, default_project, series, missing):
    body = {"projectId": default_project, "series": [entry()], "tags": []}
    del body[missing]
    res = client.post("/api/cases", json=body, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_series_must_not_be_empty(client, auth_headers, default_project, series):
    res = client.post("/api/cases", json={"projectId": default_project, "series": [], "tags": []},
                      headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_unknown_project_is_404(client, auth_headers, series):
    res = client.post("/api/cases", json={"projectId": "nope", "series": [entry("9.9.9")],
                                          "tags": []}, headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested project was not found."}


def test_caller_without_write_gets_401_before_pvd_checks(client, auth_headers, default_project,
                                                         series):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(UID1, pvd(1, 10, 0))], "tags": []},
                      headers=auth_headers["guest"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "write" privilege of this project.'}


@pytest.mark.parametrize("descriptor", [pvd(1, 10, 0), pvd(10, 1, 1), pvd(0, 5, 1),
                                        {"start": 1, "end": 10}, pvd(1, 10, 4)])
def test_invalid_descriptor_is_400(client, auth_headers, default_project, series, descriptor):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(UID1, descriptor)], "tags": []},
                      headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"].startswith("Invalid partial volume descriptor: ")


@pytest.mark.parametrize("uid, descriptor", [(UID1, pvd(1, 11)), (UID2, pvd(1, 9)),
                                             (UID2, pvd(4, 7, 3))])
def test_descriptor_outside_stored_images_is_400(client, auth_headers, default_project, series,
                                                 uid, descriptor):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(uid, descriptor)], "tags": []},
                      headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Specified range is invalid."}


def test_descriptor_on_stored_images_with_gaps_is_accepted(client, auth_headers,
                                                           default_project, series):
    create_case(client, auth_headers["bob"], default_project, [entry(UID2, pvd(2, 8, 3))])


def test_nonexistent_series_is_400(client, auth_headers, default_project, series):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(UID1), entry("1.2.3.999")],
                                          "tags": []}, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Nonexistent series."}


def test_series_in_a_domain_the_caller_lacks_is_403(client, auth_headers, default_project,
                                                    series):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(UID_OTHER_DOMAIN)], "tags": []},
                      headers=auth_headers["bob"])
    assert res.status_code == 403
    assert res.get_json() == {"error": "You do not have privilege to access this series."}
    with client.application.app_context():
        assert db.session.execute(db.select(db.func.count(ClinicalCase.case_id))).scalar() == 0


def test_series_of_two_domains_are_refused(app, client, default_project, series):
    both = persona(app, "carol@example.com", domains=["default", "sirius"],
                   read_projects=[default_project], write_projects=[default_project])
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry(UID1), entry(UID_OTHER_DOMAIN)],
                                          "tags": []}, headers=both)
    assert res.status_code == 400
    assert res.get_json() == {"error": "All series must belong to the same domain."}
    case_id = create_case(client, both, default_project, [entry(UID_OTHER_DOMAIN)])
    doc = client.get(f"/api/cases/{case_id}", headers=both).get_json()
    assert doc["domains"] == ["sirius"]


def test_tag_over_32_characters_is_refused_at_creation(client, auth_headers, default_project,
                                                       series):
    res = client.post("/api/cases", json={"projectId": default_project, "series": [entry()],
                                          "tags": ["x" * 33]}, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Tag length is too large"}


@pytest.mark.parametrize("folder, expected", [("head-first", pvd(1, 10, 1)),
                                              ("foot-first", pvd(10, 1, -1))])
def test_auto_descriptor_follows_the_slice_positions(app, client, auth_headers, default_project,
                                                     dicom_dir, folder, expected):
    uid = import_shared_series(app, dicom_dir / folder)
    case_id = create_case(client, auth_headers["bob"], default_project, [entry(uid, "auto")])
    doc = client.get(f"/api/cases/{case_id}", headers=auth_headers["bob"]).get_json()
    assert doc["revisions"][0]["series"][0]["partialVolumeDescriptor"] == expected


def test_auto_descriptor_of_unknown_series_is_404(client, auth_headers, default_project, series):
    res = client.post("/api/cases", json={"projectId": default_project,
                                          "series": [entry("1.2.3.404", "auto")], "tags": []},
                      headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested series was not found."}


# --- GET /api/cases/<id> -------------------------------------------------------------------

def test_get_case_needs_read_role(client, auth_headers, default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    res = client.get(f"/api/cases/{case_id}", headers=auth_headers["guest"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "read" privilege of this project.'}
    res = client.get("/api/cases/01hzzzzzzzzzzzzzzzzzzzzzzz", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested clinicalCase was not found."}


# --- GET /api/cases ----------------------------------------------------------------------

@pytest.fixture
def two_projects(app, client, auth_headers, default_project, series):
    """A case in the default project and one in a project bob cannot read."""
    with app.app_context():
        other = make_project("other").project_id
        db.session.commit()
    mine = create_case(client, auth_headers["bob"], default_project, tags=["a"])
    theirs_headers = persona(app, "dave@example.com", read_projects=[other],
                             write_projects=[other])
    theirs = create_case(client, theirs_headers, other, [entry(UID2, pvd(1, 5))], tags=["a"])
    return {"mine": mine, "theirs": theirs, "other": other}


def test_search_returns_only_readable_projects(client, auth_headers, two_projects):
    res = search(client, auth_headers["bob"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 1 and body["page"] == 1
    (item,) = body["items"]
    assert item["caseId"] == two_projects["mine"]
    assert set(item) == {"caseId", "projectId", "tags", "latestRevision", "domains",
                         "patientInfo", "createdAt", "updatedAt"}
    assert item["latestRevision"]["description"] == "Created new case."
    assert item["patientInfo"] == {"patientId": "P1", "patientName": "Anzu", "age": 30, "sex": "F"}
    assert search(client, auth_headers["guest"]).get_json() == {
        "items": [], "totalItems": 0, "page": 1}


def test_search_filters_tags_and_dates_and_sorts(client, auth_headers, default_project, series):
    ids = [create_case(client, auth_headers["bob"], default_project, tags=tags)
           for tags in (["a"], ["b"], ["a", "b"])]
    with client.application.app_context():
        for i, case_id in enumerate(ids):  # days 1, 2, 3 of January 2024
            db.session.get(ClinicalCase, case_id).created_at = \
                ClinicalCase.created_at.type.python_type(2024, 1, 1 + i)
        db.session.commit()
    body = search(client, auth_headers["bob"], filter={"tags": "a"}).get_json()
    assert [i["caseId"] for i in body["items"]] == [ids[2], ids[0]]  # createdAt descending
    flt = {"$and": [{"tags": "b"},
                    {"createdAt": {"$gte": {"$date": "2024-01-02T00:00:00Z"}}},
                    {"createdAt": {"$lt": {"$date": "2024-01-03T00:00:00Z"}}}]}
    body = search(client, auth_headers["bob"], filter=flt).get_json()
    assert [i["caseId"] for i in body["items"]] == [ids[1]]
    body = search(client, auth_headers["bob"], sort={"createdAt": 1}, limit=2, page=2).get_json()
    assert body == {**body, "totalItems": 3, "page": 2}
    assert [i["caseId"] for i in body["items"]] == [ids[2]]
    body = search(client, auth_headers["bob"], filter={"tags": {"$all": ["a", "b"]}}).get_json()
    assert [i["caseId"] for i in body["items"]] == [ids[2]]
    assert search(client, auth_headers["bob"], filter={"domains": "x"}).get_json() == {
        "error": "Bad filter."}


def test_patient_info_filter_needs_global_privilege(app, client, default_project, series):
    headers = persona(app, "erin@example.com", read_projects=[default_project],
                      view_personal_info_projects=[default_project])
    res = search(client, headers, filter={"patientInfo.sex": "F"})
    assert res.status_code == 400
    assert res.get_json() == {"error": "You cannot search using patient information."}


def test_patient_info_masked_by_project_role_also_in_filters(app, client, auth_headers,
                                                             default_project, series):
    create_case(client, auth_headers["bob"], default_project)
    # Global personalInfoView, read role, but no viewPersonalInfo role on the project.
    headers = persona(app, "frank@example.com", privileges=["personalInfoView"],
                      read_projects=[default_project])
    body = search(client, headers).get_json()
    assert body["totalItems"] == 1 and "patientInfo" not in body["items"][0]
    assert search(client, headers, filter={"patientInfo.patientName": "Anzu"}).get_json()[
        "totalItems"] == 0
    assert search(client, headers, filter={"patientInfo.age": {"$ne": 30}}).get_json()[
        "totalItems"] == 1  # the masked value is missing, and $ne matches missing
    # bob holds the role: the same filters see the value.
    assert search(client, auth_headers["bob"], filter={"patientInfo.patientName": "Anzu"}
                  ).get_json()["totalItems"] == 1
    assert search(client, auth_headers["bob"], filter={
        "patientInfo.patientName": {"$regex": "^an", "$options": "i"}}).get_json()[
        "totalItems"] == 1
    assert search(client, auth_headers["bob"], filter={"patientInfo.age": {"$gte": 31}}
                  ).get_json()["totalItems"] == 0


def test_patient_info_hidden_by_preference_but_still_searchable(app, client, default_project,
                                                                auth_headers, series):
    create_case(client, auth_headers["bob"], default_project)
    headers = persona(app, "gina@example.com", privileges=["personalInfoView"],
                      preferences={"personalInfoView": False},
                      read_projects=[default_project],
                      view_personal_info_projects=[default_project])
    body = search(client, headers, filter={"patientInfo.sex": "F"}).get_json()
    assert body["totalItems"] == 1
    assert "patientInfo" not in body["items"][0]


def test_patient_info_comes_from_first_series_of_latest_revision(client, auth_headers,
                                                                 default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    res = client.post(f"/api/cases/{case_id}/revision", headers=auth_headers["bob"],
                      json=revision(UID2, series=[
                          {"seriesUid": UID2, "labels": []}, {"seriesUid": UID1, "labels": []}]))
    assert res.status_code == 201
    (item,) = search(client, auth_headers["bob"]).get_json()["items"]
    assert item["patientInfo"]["patientName"] == "Koume"
    assert search(client, auth_headers["bob"], filter={"patientInfo.patientId": "P2"}
                  ).get_json()["totalItems"] == 1


def test_case_whose_series_was_deleted_stays_in_results(client, auth_headers, default_project,
                                                        series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    with client.application.app_context():
        db.session.delete(db.session.get(Series, UID1))
        db.session.commit()
    (item,) = search(client, auth_headers["bob"]).get_json()["items"]
    assert item["caseId"] == case_id and "patientInfo" not in item


# --- tags --------------------------------------------------------------------------------

def tags_of(app, case_id):
    with app.app_context():
        case = db.session.get(ClinicalCase, case_id)
        mirror = set(db.session.execute(db.select(CaseTag.tag).where(
            CaseTag.case_id == case_id)).scalars())
        return list(case.tags), mirror, case.updated_at


def test_put_tags_replaces_and_bumps_updated_at(app, client, auth_headers, default_project,
                                                series):
    case_id = create_case(client, auth_headers["bob"], default_project, tags=["a"])
    _, _, before = tags_of(app, case_id)
    res = client.put(f"/api/cases/{case_id}/tags", json=["x", "y"], headers=auth_headers["bob"])
    assert res.status_code == 204
    tags, mirror, after = tags_of(app, case_id)
    assert tags == ["x", "y"] and mirror == {"x", "y"} and after > before
    assert search(client, auth_headers["bob"], filter={"tags": "x"}).get_json()["totalItems"] == 1
    assert search(client, auth_headers["bob"], filter={"tags": "a"}).get_json()["totalItems"] == 0


def test_put_tag_over_32_characters_is_refused(app, client, auth_headers, default_project,
                                               series):
    case_id = create_case(client, auth_headers["bob"], default_project, tags=["a"])
    res = client.put(f"/api/cases/{case_id}/tags", json=["x" * 33], headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Tag length is too large"}
    assert client.put(f"/api/cases/{case_id}/tags", json=["x" * 32],
                      headers=auth_headers["bob"]).status_code == 204


def test_put_tags_needs_write_before_body_validation(client, auth_headers, default_project,
                                                     series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    res = client.put(f"/api/cases/{case_id}/tags", json={"bad": 1}, headers=auth_headers["guest"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "write" privilege of this project.'}
    res = client.put("/api/cases/unknown/tags", json={"bad": 1}, headers=auth_headers["bob"])
    assert res.status_code == 404


def test_bulk_tags_add_remove_set_without_touching_updated_at(app, client, auth_headers,
                                                              default_project, series):
    one = create_case(client, auth_headers["bob"], default_project, tags=["a", "b"])
    two = create_case(client, auth_headers["bob"], default_project, tags=["c"])
    _, _, before = tags_of(app, one)

    def patch(operation, tags):
        res = client.patch("/api/cases/tags", headers=auth_headers["bob"],
                           json={"operation": operation, "tags": tags, "caseIds": [one, two]})
        assert res.status_code == 204, res.get_json()

    patch("add", ["b", "d", "d"])
    assert tags_of(app, one)[:2] == (["a", "b", "d"], {"a", "b", "d"})
    assert tags_of(app, two)[:2] == (["c", "b", "d"], {"c", "b", "d"})
    patch("remove", ["b", "zz"])
    assert tags_of(app, one)[:2] == (["a", "d"], {"a", "d"})
    assert tags_of(app, two)[:2] == (["c", "d"], {"c", "d"})
    patch("set", [])
    assert tags_of(app, one)[:2] == ([], set())
    assert tags_of(app, one)[2] == before


@pytest.mark.parametrize("body, message", [
    ({"operation": "add", "tags": ["a"] * 11}, "Too many tags."),
    ({"operation": "add", "tags": []}, "You must specify at least one tag."),
    ({"operation": "remove", "tags": []}, "You must specify at least one tag."),
    ({"operation": "set", "tags": ["x" * 33]}, "The specified tag is too long."),
])
def test_bulk_tags_refusals(client, auth_headers, default_project, series, body, message):
    case_id = create_case(client, auth_headers["bob"], default_project)
    res = client.patch("/api/cases/tags", json={**body, "caseIds": [case_id]},
                       headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


def test_bulk_tags_on_1001_cases_is_refused(app, client, auth_headers, default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project, tags=["a"])
    ids = [case_id] + [f"missing{i}" for i in range(1000)]
    res = client.patch("/api/cases/tags", json={"operation": "add", "tags": ["b"],
                                                "caseIds": ids}, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Too many case IDs"}
    assert tags_of(app, case_id)[0] == ["a"]


def test_bulk_tags_unknown_case_and_no_write(client, auth_headers, two_projects):
    res = client.patch("/api/cases/tags", headers=auth_headers["bob"], json={
        "operation": "add", "tags": ["b"], "caseIds": [two_projects["mine"], "nope"]})
    assert res.status_code == 404
    assert res.get_json() == {"error": "Some case does not exist"}
    res = client.patch("/api/cases/tags", headers=auth_headers["bob"], json={
        "operation": "add", "tags": ["b"],
        "caseIds": [two_projects["mine"], two_projects["theirs"]]})
    assert res.status_code == 401
    assert res.get_json() == {
        "error": "You do not have write access to some of the specified cases."}


# --- DELETE ------------------------------------------------------------------------------

def test_delete_needs_moderate(client, auth_headers, default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    res = client.delete(f"/api/cases/{case_id}", headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json() == {"error": 'You do not have "moderate" privilege of this project.'}
    assert client.delete(f"/api/cases/{case_id}", headers=auth_headers["alice"]).status_code == 204
    assert client.get(f"/api/cases/{case_id}", headers=auth_headers["alice"]).status_code == 404
    with client.application.app_context():
        for table in (CaseTag, CaseSeries):
            assert db.session.execute(db.select(table).where(
                table.case_id == case_id)).first() is None
    assert client.delete(f"/api/cases/{case_id}", headers=auth_headers["alice"]).status_code == 404


def test_case_in_someones_my_list_needs_force(client, auth_headers, default_project, series):
    case_id = create_case(client, auth_headers["bob"], default_project)
    list_id = client.post("/api/mylists", headers=auth_headers["bob"], json={
        "name": "to check", "resourceType": "clinicalCases", "public": False}).get_json()["myListId"]
    assert client.patch(f"/api/mylists/{list_id}/items", headers=auth_headers["bob"], json={
        "operation": "add", "resourceIds": [case_id]}).status_code == 200
    res = client.delete(f"/api/cases/{case_id}", headers=auth_headers["alice"])
    assert res.status_code == 403
    assert res.get_json() == {"error": "This case is in someone's my list."}
    res = client.delete(f"/api/cases/{case_id}?force=1", headers=auth_headers["alice"])
    assert res.status_code == 204
    with client.application.app_context():
        assert db.session.execute(db.select(MyListItem)).first() is None
    res = client.get(f"/api/mylists/{list_id}", headers=auth_headers["bob"])
    assert res.get_json()["resourceIds"] == []


# --- GET /api/cases/list/<id> ------------------------------------------------------------

def make_list(client, headers, resource_type="clinicalCases", public=False, ids=()):
    list_id = client.post("/api/mylists", headers=headers, json={
        "name": "list", "resourceType": resource_type, "public": public}).get_json()["myListId"]
    for resource_id in ids:  # one request each, so addedToListAt differs
        res = client.patch(f"/api/mylists/{list_id}/items", headers=headers, json={
            "operation": "add", "resourceIds": [resource_id]})
        assert res.status_code == 200, res.get_json()
    return list_id


def test_list_search_in_own_list(app, client, auth_headers, default_project, series):
    ids = [create_case(client, auth_headers["bob"], default_project, tags=[t]) for t in "abc"]
    list_id = make_list(client, auth_headers["bob"], ids=[ids[1], ids[0]])
    body = search(client, auth_headers["bob"], f"/api/cases/list/{list_id}").get_json()
    assert body["totalItems"] == 2
    assert [i["caseId"] for i in body["items"]] == [ids[0], ids[1]]  # addedToListAt desc
    assert "addedToListAt" not in body["items"][0]
    body = search(client, auth_headers["bob"], f"/api/cases/list/{list_id}",
                  sort={"addedToListAt": 1}, filter={"tags": {"$in": ["a", "b"]}}).get_json()
    assert [i["caseId"] for i in body["items"]] == [ids[1], ids[0]]
    body = search(client, auth_headers["bob"], f"/api/cases/list/{list_id}",
                  filter={"tags": "c"}).get_json()
    assert body["totalItems"] == 0


def test_list_search_refusals_and_public_lists(app, client, auth_headers, two_projects):
    series_list = make_list(client, auth_headers["bob"], "series")
    res = search(client, auth_headers["bob"], f"/api/cases/list/{series_list}")
    assert res.status_code == 400
    assert res.get_json() == {"error": "This my list is not for cases"}
    res = search(client, auth_headers["bob"], "/api/cases/list/nope")
    assert res.status_code == 404
    assert res.get_json() == {"error": "This my list does not exist"}
    dave = persona(app, "dave2@example.com", read_projects=[two_projects["other"]])
    private = make_list(client, dave, ids=[two_projects["theirs"]])
    assert search(client, auth_headers["bob"], f"/api/cases/list/{private}").status_code == 404
    public = make_list(client, dave, public=True,
                       ids=[two_projects["theirs"], two_projects["mine"]])
    # bob may read the public list, but only the cases of projects he can read appear.
    body = search(client, auth_headers["bob"], f"/api/cases/list/{public}").get_json()
    assert [i["caseId"] for i in body["items"]] == [two_projects["mine"]]


def test_patient_info_masked_per_project_when_roles_differ(app, client, auth_headers,
                                                           default_project, series):
    with app.app_context():
        other = make_project("other").project_id
        db.session.commit()
    mixed = persona(app, "jane@example.com", privileges=["personalInfoView"],
                    read_projects=[default_project, other], write_projects=[other],
                    view_personal_info_projects=[default_project])
    shown = create_case(client, auth_headers["bob"], default_project)
    hidden = create_case(client, mixed, other)  # same series: same patient
    items = {i["caseId"]: i for i in search(client, mixed).get_json()["items"]}
    assert items[shown]["patientInfo"]["patientName"] == "Anzu"
    assert "patientInfo" not in items[hidden]
    body = search(client, mixed, filter={"patientInfo.patientName": "Anzu"}).get_json()
    assert [i["caseId"] for i in body["items"]] == [shown]


def test_concurrent_bulk_additions_lose_no_tag(app, auth_headers, default_project, series):
    import threading
    client = app.test_client()
    case_id = create_case(client, auth_headers["bob"], default_project, tags=["base"])
    barrier, statuses = threading.Barrier(6), []

    def add(tag):
        own = app.test_client()
        barrier.wait()
        res = own.patch("/api/cases/tags", headers=auth_headers["bob"], json={
            "operation": "add", "tags": [tag], "caseIds": [case_id]})
        statuses.append(res.status_code)

    threads = [threading.Thread(target=add, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [204] * 6
    tags, mirror, _ = tags_of(app, case_id)
    assert sorted(tags) == ["base"] + [f"t{i}" for i in range(6)]
    assert mirror == set(tags)
