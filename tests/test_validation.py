"""The one request-JSON decoder: depth limit and strict JSON on every route and in search."""
import json
from urllib.parse import quote

import pytest

from models import ClinicalCase, db
from tests.case_helpers import create_case, revision, seed_series
from validation import JsonTooDeep, decode_json, json_depth

TOO_DEEP = "Invalid JSON as request body.\nNested more than 64 levels deep"
NESTED_ARRAYS = "[" * 100000 + "]" * 100000
NESTED_OBJECTS = '{"a":' * 50000 + "1" + "}" * 50000
JSON_ROUTES = [
    ("post", "/api/mylists"),
    ("post", "/api/cases"),
    ("post", "/api/cases/{case}/revision"),
    ("patch", "/api/cases/tags"),
    ("put", "/api/cases/{case}/tags"),
    ("post", "/api/cases/export-mhd"),
    ("post", "/api/series/export-cs-volume"),
    ("post", "/api/tokens"),
    ("post", "/api/plugin-jobs"),
    ("patch", "/api/preferences"),
    ("post", "/api/admin/groups"),
    ("patch", "/api/admin/users/alice@example.com"),
    ("post", "/api/admin/projects"),
    ("put", "/api/admin/server-params"),
    ("put", "/api/admin/server-params/colors"),
    ("post", "/api/admin/onetime-urls"),
]


def nest(levels, leaf=1):
    """``levels`` objects, each the only value of the one before."""
    doc = leaf
    for _ in range(levels):
        doc = {"a": doc}
    return doc


@pytest.fixture
def case_id(app, client, auth_headers, default_project):
    seed_series(app)
    return create_case(client, auth_headers["alice"], default_project)


def send(client, headers, method, path, text):
    return getattr(client, method)(path, data=text, content_type="application/json",
                                   headers=headers)


@pytest.mark.parametrize("method, path", JSON_ROUTES)
@pytest.mark.parametrize("text", [NESTED_ARRAYS, NESTED_OBJECTS], ids=["arrays", "objects"])
def test_deep_nesting_is_a_400_everywhere(client, auth_headers, case_id, method, path, text):
    res = send(client, auth_headers["alice"], method, path.format(case=case_id), text)
    assert (res.status_code, res.get_json()) == (400, {"error": TOO_DEEP})


@pytest.mark.parametrize("method, path", JSON_ROUTES)
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(client, auth_headers, case_id, method, path, constant):
    res = send(client, auth_headers["alice"], method, path.format(case=case_id),
               '{"a": [%s]}' % constant)
    assert res.status_code == 400
    assert res.get_json() == {"error": f"Invalid JSON as request body.\n{constant} is not valid JSON"}


def test_nan_is_not_stored_as_null_in_server_params(client, auth_headers):
    headers = auth_headers["alice"]
    res = send(client, headers, "put", "/api/admin/server-params", '{"a": NaN}')
    assert res.status_code == 400
    params = client.get("/api/admin/server-params", headers=headers).get_json()
    assert "a" not in params


def test_nan_and_infinity_are_not_stored_in_a_revision(app, client, auth_headers, case_id):
    body = json.dumps(revision(attributes={"v": 0, "w": 0})).replace(
        '"v": 0', '"v": NaN').replace('"w": 0', '"w": Infinity')
    res = send(client, auth_headers["alice"], "post", f"/api/cases/{case_id}/revision", body)
    assert res.status_code == 400
    assert res.get_json() == {"error": "Invalid JSON as request body.\nNaN is not valid JSON"}
    with app.app_context():
        assert db.session.get(ClinicalCase, case_id).revision_count == 1


def test_a_revision_just_under_the_limit_is_accepted(client, auth_headers, case_id):
    headers = auth_headers["alice"]
    deepest = revision(attributes=nest(63))
    assert json_depth(json.dumps(deepest)) == 64
    res = client.post(f"/api/cases/{case_id}/revision", json=deepest, headers=headers)
    assert res.status_code == 201, res.get_json()
    doc = client.get(f"/api/cases/{case_id}", headers=headers).get_json()
    assert doc["revisions"][-1]["attributes"] == nest(63)
    res = client.post(f"/api/cases/{case_id}/revision", json=revision(attributes=nest(64)),
                      headers=headers)
    assert (res.status_code, res.get_json()) == (400, {"error": TOO_DEEP})


def test_server_params_just_under_the_limit_are_accepted(client, auth_headers):
    headers = auth_headers["alice"]
    res = client.put("/api/admin/server-params", json={"deep": nest(63)}, headers=headers)
    assert res.status_code == 204
    assert client.get("/api/admin/server-params/deep", headers=headers).get_json() == nest(63)
    res = client.put("/api/admin/server-params", json={"deep": nest(64)}, headers=headers)
    assert (res.status_code, res.get_json()) == (400, {"error": TOO_DEEP})


@pytest.mark.parametrize("text, message", [
    ('{"a":' * 2000 + "1" + "}" * 2000, "The filter is nested too deeply (at most 8 levels)."),
    (json.dumps(nest(64)), "The filter is nested too deeply (at most 8 levels)."),
    ('{"width": NaN}', "Invalid JSON was passed as a filter string"),
    ('{"width": {"$gt": -Infinity}}', "Invalid JSON was passed as a filter string"),
    ('{"width": Infinity}', "Invalid JSON was passed as a filter string"),
])
def test_filter_goes_through_the_decoder(client, auth_headers, text, message):
    res = client.get(f"/api/series?filter={quote(text)}", headers=auth_headers["alice"])
    assert (res.status_code, res.get_json()) == (400, {"error": message})


@pytest.mark.parametrize("path", ["/api/series", "/api/cases", "/api/admin/users"])
@pytest.mark.parametrize("text", [NESTED_ARRAYS, NESTED_OBJECTS, '{"seriesUid": NaN}',
                                  '{"createdAt": -Infinity}'])
def test_sort_goes_through_the_decoder(client, auth_headers, path, text):
    res = client.get(f"{path}?sort={quote(text)}", headers=auth_headers["alice"])
    assert (res.status_code, res.get_json()) == (400, {"error": "Bad sort parameter. Invalid JSON."})


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ('"[[{{"', 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4),
    (r'["\"[[[", [[]]]', 3), (r'["\\", [[]]]', 3), ('"unterminated [[[', 0),
    ("]]][[[", 0), ("[[]][[[]]]", 3),
])
def test_json_depth_ignores_brackets_in_strings(text, depth):
    assert json_depth(text) == depth


def test_decode_json_checks_depth_before_parsing(app):
    with app.app_context():
        assert decode_json(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}
        assert decode_json("[[1]]", max_depth=2) == [[1]]
        with pytest.raises(JsonTooDeep):
            decode_json("[[[1]]]", max_depth=2)
        with pytest.raises(JsonTooDeep):  # a parser that ran first would recurse, not answer
            decode_json("[" * 1000000)
        with pytest.raises(ValueError):
            decode_json(b"\xff[]")


def test_depth_limit_is_a_setting(app, client, auth_headers):
    app.config["JSON_MAX_DEPTH"] = 3
    headers = auth_headers["alice"]
    res = client.put("/api/admin/server-params", json={"a": [[1]]}, headers=headers)
    assert res.status_code == 204
    res = client.put("/api/admin/server-params", json={"a": [[[1]]]}, headers=headers)
    assert res.get_json() == {"error": "Invalid JSON as request body.\nNested more than 3 levels deep"}
