"""POST /api/cases/<id>/revision: labels, blobs, privileges, If-Match and concurrency."""
import hashlib
import threading

import pytest

from models import CaseRevision, CaseSeries, ClinicalCase, db
from tests.case_helpers import UID1, UID2, create_case, persona, revision, seed_series

OCTET = {"Content-Type": "application/octet-stream"}
HASH_A = "a" * 40


@pytest.fixture
def case_id(app, client, auth_headers, default_project):
    seed_series(app)
    return create_case(client, auth_headers["bob"], default_project)


def post(client, headers, case_id, body, **extra):
    return client.post(f"/api/cases/{case_id}/revision", json=body, headers={**headers, **extra})


def store_blob(client, headers, data):
    digest = hashlib.sha1(data).hexdigest()
    res = client.put(f"/api/blob/{digest}", data=data, headers={**headers, **OCTET})
    assert res.status_code == 201
    return digest


def every_label_type(voxels):
    return [
        {"type": "voxel", "name": "lesion", "attributes": {"malignant": True},
         "data": {"voxels": voxels, "origin": [1, 2, 3], "size": [8, 8, 1],
                  "color": "#ff0000", "alpha": 0.5}},
        {"type": "voxel", "data": {"voxels": None}},
        {"type": "cuboid", "data": {"min": [0, 0, 0], "max": [1.5, 2, 3]}},
        {"type": "ellipsoid", "data": {"min": [0, 0, 0], "max": [1, 2, 3]}},
        {"type": "rectangle", "name": None, "data": {"min": [0, 0], "max": [1, 2], "z": 3}},
        {"type": "ellipse", "data": {"min": [0, 0], "max": [1, 2], "z": 3.5}},
        {"type": "polyline", "data": {"points": [[0, 0], [1, 1], [2, 0]], "z": 1}},
        {"type": "point", "data": {"location": [1, 2, 3], "color": "#00ff00"}},
        {"type": "ruler", "data": {"section": {"origin": [0, 0, 0], "xAxis": [1, 0, 0],
                                               "yAxis": [0, 1, 0]},
                                   "start": [0, 0, 0], "end": [5, 5, 5],
                                   "labelPosition": [3, 4]}},
    ]


def test_append_revision_with_every_label_type(client, auth_headers, case_id):
    digest = store_blob(client, auth_headers["bob"], b"\xff\x00" * 4)
    body = revision(labels=every_label_type(digest), attributes={"grade": 2})
    res = post(client, auth_headers["bob"], case_id, body)
    assert res.status_code == 201
    assert res.data == b""
    assert res.headers["ETag"] == '"rev-1"'
    doc = client.get(f"/api/cases/{case_id}", headers=auth_headers["alice"]).get_json()
    first, second = doc["revisions"]
    assert first["description"] == "Created new case."
    assert second["creator"] == "bob@example.com" and second["date"].endswith("Z")
    assert {k: second[k] for k in ("description", "attributes", "status", "series")} == {
        k: body[k] for k in ("description", "attributes", "status", "series")}
    assert doc["updatedAt"] >= doc["createdAt"]
    item = client.get("/api/cases", headers=auth_headers["bob"]).get_json()["items"][0]
    assert item["latestRevision"] == second


@pytest.mark.parametrize("field, message", [("date", "You cannot specify revision date."),
                                            ("creator", "You cannot specify revision creator.")])
def test_date_and_creator_are_refused(client, auth_headers, case_id, field, message):
    res = post(client, auth_headers["bob"], case_id,
               revision(**{field: "2020-01-01T00:00:00.000Z" if field == "date" else "x@y"}))
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


@pytest.mark.parametrize("missing", ["description", "attributes", "status", "series"])
def test_every_revision_field_is_required(client, auth_headers, case_id, missing):
    body = revision()
    del body[missing]
    res = post(client, auth_headers["bob"], case_id, body)
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


@pytest.mark.parametrize("label", [
    {"type": "blob", "data": {}},  # unknown type
    {"type": "point", "data": {"location": [1, 2]}},
    {"type": "cuboid", "data": {"min": [0, 0, 0]}},
    {"type": "rectangle", "data": {"min": [0, 0], "max": [1, 1]}},
    {"type": "polyline", "data": {"points": [], "z": 0}},
    {"type": "ruler", "data": {"section": {}, "start": [0, 0, 0], "end": [1, 1, 1]}},
    {"type": "voxel", "data": {"voxels": "not-a-hash"}},
    {"type": "voxel", "data": {"voxels": None, "origin": [0, 0]}},
    {"type": "voxel", "data": {"voxels": None, "color": "#FF0000"}},
    {"type": "voxel", "data": {"voxels": None, "alpha": 2}},
    {"type": "point", "data": {"location": [1, 2, 3]}, "extra": 1},
    {"data": {"location": [1, 2, 3]}},
])
def test_malformed_labels_are_refused(client, auth_headers, case_id, label):
    res = post(client, auth_headers["bob"], case_id, revision(labels=[label]))
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."
    assert res.get_json()["validationErrors"]


def test_invalid_descriptor_in_a_revision_is_refused(client, auth_headers, case_id):
    body = revision()
    body["series"][0]["partialVolumeDescriptor"] = {"start": 1, "end": 10, "delta": 0}
    res = post(client, auth_headers["bob"], case_id, body)
    assert res.status_code == 400
    assert res.get_json()["error"].startswith("Invalid partial volume descriptor: ")


def test_voxel_label_must_reference_a_stored_blob(client, auth_headers, case_id):
    stored = store_blob(client, auth_headers["bob"], b"\x01")
    labels = [{"type": "voxel", "data": {"voxels": HASH_A}},
              {"type": "voxel", "data": {"voxels": stored}},
              {"type": "voxel", "data": {"voxels": "b" * 40}},
              {"type": "voxel", "data": {"voxels": HASH_A}}]
    res = post(client, auth_headers["bob"], case_id, revision(labels=labels))
    assert res.status_code == 400
    assert res.get_json() == {"error": f"Some voxel data are missing ({HASH_A}, {'b' * 40}). "
                                       "Store them first."}
    with client.application.app_context():
        assert db.session.get(ClinicalCase, case_id).revision_count == 1
    res = post(client, auth_headers["bob"], case_id,
               revision(labels=[{"type": "voxel", "data": {"voxels": stored}}]))
    assert res.status_code == 201


def test_caller_without_write_cannot_post(app, client, auth_headers, case_id, default_project):
    reader = persona(app, "reader@example.com", read_projects=[default_project])
    for headers in (reader, auth_headers["guest"]):
        # The role check answers before the (bad) body is validated.
        res = post(client, headers, case_id, {"bad": True})
        assert res.status_code == 401
        assert res.get_json() == {"error": 'You do not have "write" privilege of this project.'}
    res = post(client, auth_headers["bob"], "01hzzzzzzzzzzzzzzzzzzzzzzz", {"bad": True})
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested clinicalCase was not found."}


def test_revisions_are_append_only(client, auth_headers, case_id):
    for method in ("put", "patch", "delete"):
        res = getattr(client, method)(f"/api/cases/{case_id}/revision", json={},
                                      headers=auth_headers["alice"])
        assert res.status_code == 405


def test_revision_records_its_series_and_moves_first_series(client, auth_headers, case_id):
    res = post(client, auth_headers["bob"], case_id, revision(UID2))
    assert res.status_code == 201
    with client.application.app_context():
        assert set(db.session.execute(db.select(CaseSeries.series_uid).where(
            CaseSeries.case_id == case_id)).scalars()) == {UID1, UID2}
        assert db.session.get(ClinicalCase, case_id).first_series_uid == UID2


# --- concurrent editing -----------------------------------------------------------------

def test_if_match_refuses_a_stale_revision(client, auth_headers, case_id):
    res = client.get(f"/api/cases/{case_id}", headers=auth_headers["bob"])
    loaded = res.headers["ETag"]
    assert loaded == '"rev-0"'
    res = post(client, auth_headers["bob"], case_id, revision(description="first"),
               **{"If-Match": loaded})
    assert res.status_code == 201
    assert res.headers["ETag"] == '"rev-1"'
    res = post(client, auth_headers["alice"], case_id, revision(description="stale"),
               **{"If-Match": loaded})
    assert res.status_code == 412
    assert "error" in res.get_json()
    res = post(client, auth_headers["alice"], case_id, revision(), **{"If-Match": '"rev-1"'})
    assert res.status_code == 201
    # Without If-Match it behaves as CIRCUS does: always appended.
    assert post(client, auth_headers["alice"], case_id, revision()).status_code == 201
    doc = client.get(f"/api/cases/{case_id}", headers=auth_headers["bob"])
    assert doc.headers["ETag"] == '"rev-3"'
    assert [r["description"] for r in doc.get_json()["revisions"]][:2] == [
        "Created new case.", "first"]


def _run_concurrently(app, headers, case_id, bodies_per_thread, threads, if_match=None):
    statuses, barrier = [], threading.Barrier(threads)

    def work():
        client = app.test_client()
        barrier.wait()
        for i in range(bodies_per_thread):
            extra = {"If-Match": if_match} if if_match else {}
            res = post(client, headers, case_id, revision(description=f"r{i}"), **extra)
            statuses.append(res.status_code)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def test_concurrent_appends_lose_nothing(app, auth_headers, case_id):
    statuses = _run_concurrently(app, auth_headers["bob"], case_id, 5, 8)
    assert statuses == [201] * 40
    with app.app_context():
        case = db.session.get(ClinicalCase, case_id)
        indexes = list(db.session.execute(db.select(CaseRevision.revision_index).where(
            CaseRevision.case_id == case_id).order_by(CaseRevision.revision_index)).scalars())
        assert case.revision_count == 41 and indexes == list(range(41))
        last = db.session.execute(db.select(CaseRevision.data).where(
            CaseRevision.case_id == case_id, CaseRevision.revision_index == 40)).scalar_one()
        assert case.latest_revision == last


def test_concurrent_if_match_lets_exactly_one_win(app, auth_headers, case_id):
    statuses = _run_concurrently(app, auth_headers["bob"], case_id, 1, 6, if_match='"rev-0"')
    assert sorted(statuses) == [201] + [412] * 5
    with app.app_context():
        assert db.session.get(ClinicalCase, case_id).revision_count == 2
