"""The search protocol of API.md 1.8 (search.py): errors, operators, Extended JSON, $regex
as LIKE, array fields and hostile filters.

A test-only route runs ``search.search`` over series and cases with a small allow-list, so
the whole path (query string -> SQL -> envelope) is exercised; ``compile_filter`` is also
called directly. Admin lists (filter ignored) cover sort and paging through a real route.
"""
import json
import os
import re
from datetime import datetime
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from app import create_app
from cli import create_initial_data
from models import CaseTag, ClinicalCase, Project, Series, db
from search import ArrayField, Regex, SearchSpec, compile_filter, regex_to_like, run
from tests.conftest import ALL_PRIVILEGES, _empty_shared_database
from tests.factories import make_group, make_series, make_token, make_user

SERIES_FIELDS = {
    "seriesUid": Series.series_uid, "modality": Series.modality,
    "seriesDescription": Series.series_description, "seriesDate": Series.series_date,
    "patientInfo.patientName": Series.patient_name, "patientInfo.age": Series.patient_age,
    "patientInfo.sex": Series.patient_sex, "width": Series.width, "createdAt": Series.created_at,
}
CASE_FIELDS = {"caseId": ClinicalCase.case_id,
               "tags": ArrayField(CaseTag.tag, CaseTag.case_id == ClinicalCase.case_id)}
SERIES = [  # uid, modality, description, date, name, age, sex, width
    ("1.1", "CT", "Chest 5%_off", datetime(2023, 1, 5), "Anzu Yamada", 30, "F", 512),
    ("1.2", "CT", "chest wide", datetime(2023, 1, 20), "Ben Kato", 55, "M", 512),
    ("1.3", "MR", "Head T1", datetime(2023, 2, 1), "anzu kato", 70, "F", 256),
    ("1.4", "MR", "Head (T2)", datetime(2022, 12, 31, 23), "Chris^Doe", 50, "M", 256),
    ("1.5", "CR", "C:\\path", None, "Dan", 42, "O", 1024),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One app for the whole module: every test here only reads.

    It has two test-only search routes (added before any request), the personas alice
    (every privilege) and guest (none), five series and four cases with tags.
    """
    config = {"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path_factory.mktemp("search")),
              "DATABASE_URL": os.environ.get("DATABASE_URL"),
              "PASSWORD_HASH_METHOD": "pbkdf2:sha256:1000"}
    app = create_app(config)

    def search_series():
        """Test-only: search series."""
        return run(SearchSpec(SERIES_FIELDS, lambda s: s.series_uid, {"seriesUid": 1}),
                   db.select(Series))

    def search_cases():
        """Test-only: search cases."""
        return run(SearchSpec(CASE_FIELDS, lambda c: c.case_id, {"caseId": 1}),
                   db.select(ClinicalCase))

    app.add_url_rule("/api/test-search/series", view_func=search_series)
    app.add_url_rule("/api/test-search/cases", view_func=search_cases)
    with app.app_context():
        if db.engine.dialect.name != "sqlite":
            _empty_shared_database()
        create_initial_data()
        _seed()
        app.config["TEST_HEADERS"] = {
            name: {"Authorization": f"Bearer {make_token(email)}"}
            for name, email in [("alice", "alice@example.com"), ("guest", "guest@example.com")]}
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def _seed():
    project_id = db.session.execute(db.select(Project.project_id)).scalar_one()
    group = make_group("everything", privileges=ALL_PRIVILEGES, domains=["default"])
    make_user("alice@example.com", "alice", groups=[group.group_id])
    make_user("guest@example.com", "guest")
    for uid, modality, description, date, name, age, sex, width in SERIES:
        make_series(uid, modality=modality, series_description=description,
                    series_date=date, width=width,
                    patient_info={"patientName": name, "age": age, "sex": sex})
    for case_id, tags in [("c1", ["urgent", "lung"]), ("c2", ["lung"]), ("c3", []),
                          ("c4", ["urgent"])]:
        db.session.add(ClinicalCase(case_id=case_id, project_id=project_id, tags=tags,
                                    latest_revision={}, domains=["default"]))
        db.session.flush()
        db.session.add_all(CaseTag(case_id=case_id, tag=t) for t in tags)
    db.session.commit()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth_headers(app):
    return app.config["TEST_HEADERS"]


@pytest.fixture
def get(client, auth_headers):
    def run(resource, filter=None, who="alice", **params):
        if filter is not None:
            params["filter"] = filter if isinstance(filter, str) else json.dumps(filter)
        query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
        return client.get(f"/api/test-search/{resource}?{query}", headers=auth_headers[who])
    return run


def uids(get, filter, resource="series", **params):
    res = get(resource, filter, **params)
    assert res.status_code == 200, res.get_json()
    return res.get_json()["items"]


# --- envelope, paging and sort ------------------------------------------------------------

def test_envelope(get):
    res = get("series")
    assert res.get_json() == {"items": ["1.1", "1.2", "1.3", "1.4", "1.5"], "totalItems": 5,
                              "page": 1}


def test_paging(get):
    assert get("series", limit=2, page=2).get_json() == {"items": ["1.3", "1.4"],
                                                        "totalItems": 5, "page": 2}
    assert get("series", limit=2, page=9).get_json() == {"items": [], "totalItems": 5, "page": 9}


def test_paging_clamps_odd_values(get):
    """Quirk 28: bad values are clamped rather than disabling paging or failing."""
    assert get("series", limit="abc").get_json()["items"] == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert get("series", limit=0).get_json()["items"] == ["1.1"]
    assert get("series", limit=-5).get_json()["items"] == ["1.1"]
    assert get("series", page=0).get_json()["page"] == 1
    assert get("series", page=-3).get_json()["page"] == 1
    assert get("series", page="x").get_json()["page"] == 1


def test_huge_page_is_an_empty_page(get):
    res = get("series", page=10 ** 30)
    assert res.status_code == 200
    assert res.get_json()["items"] == [] and res.get_json()["totalItems"] == 5


def test_limit_above_200(get):
    res = get("series", limit=201)
    assert res.status_code == 400
    assert res.get_json() == {"error": "You cannot query more than 200 items at a time."}
    assert get("series", limit=200).status_code == 200


def test_sort(get):
    assert uids(get, None, sort='{"width": -1, "seriesUid": -1}') == [
        "1.5", "1.2", "1.1", "1.4", "1.3"]
    assert uids(get, None, sort='{"patientInfo.age": 1}') == ["1.1", "1.5", "1.4", "1.2", "1.3"]
    # unknown sort keys are ignored, as sorting by a missing field is in MongoDB
    assert uids(get, None, sort='{"nothing": 1}') == ["1.1", "1.2", "1.3", "1.4", "1.5"]


@pytest.mark.parametrize("sort, message", [
    ("{bad", "Bad sort parameter. Invalid JSON."),
    ("[" * 5000, "Bad sort parameter. Invalid JSON."),
    ('[["seriesUid", 1]]', "Bad sort parameter. Non-object passed."),
    ('"seriesUid"', "Bad sort parameter. Non-object passed."),
    ('{"a":1,"b":1,"c":1,"d":1,"e":1,"f":1}', "Bad sort parameter. Too many sort keys."),
    ('{"seriesUid": 2}', "Bad sort parameter. Invalid key/value pair."),
    ('{"seriesUid": "asc"}', "Bad sort parameter. Invalid key/value pair."),
    ('{"seriesUid": true}', "Bad sort parameter. Invalid key/value pair."),
    ('{"seriesUid": 1.5}', "Bad sort parameter. Invalid key/value pair."),
    ('{"seriesUid": NaN}', "Bad sort parameter. Invalid JSON."),  # NaN is not JSON
])
def test_sort_errors(get, sort, message):
    res = get("series", sort=sort)
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


@pytest.mark.parametrize("params, message", [
    ({"sort": "{bad"}, "Bad sort parameter. Invalid JSON."),
    ({"sort": "[]"}, "Bad sort parameter. Non-object passed."),
    ({"sort": '{"a":1,"b":1,"c":1,"d":1,"e":1,"f":1}'}, "Bad sort parameter. Too many sort keys."),
    ({"sort": '{"loginId": 0}'}, "Bad sort parameter. Invalid key/value pair."),
    ({"limit": 201}, "You cannot query more than 200 items at a time."),
])
def test_errors_through_admin_users(client, auth_headers, params, message):
    query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
    res = client.get(f"/api/admin/users?{query}", headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


def test_admin_users_ignore_the_filter(client, auth_headers):
    for text in ['{"loginId": "bob"}', "{not json", '{"$where": "sleep(1000)"}']:
        res = client.get(f"/api/admin/users?filter={quote(text)}", headers=auth_headers["alice"])
        assert res.status_code == 200
        assert res.get_json()["totalItems"] == 3


# --- filter errors --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{bad", "{'a': 1}", "", "NaN", '{"width": NaN}',
                                  '{"width": Infinity}'])
def test_invalid_json(get, text):
    res = get("series", text)
    if text == "":
        assert res.status_code == 200  # no filter at all
        return
    assert res.status_code == 400
    assert res.get_json() == {"error": "Invalid JSON was passed as a filter string"}


@pytest.mark.parametrize("flt", [
    [],  # not an object
    '"modality"',
    1,
    {"unknownField": "x"},
    {"modality": None},
    {"modality": ["CT", "MR"]},  # plain arrays are not allowed
    {"modality": {"$eq": "CT"}},
    {"modality": {"$nin": ["CT"]}},
    {"modality": {"$regex": 1}},
    {"modality": {"$in": "CT"}},
    {"modality": {"$in": [None]}},
    {"modality": {"$in": [["CT"]]}},
    {"modality": {"$gt": ["CT"]}},
    {"modality": {"$gt": {"$in": ["x"]}}},
    {"modality": {}},
    {"modality": {"$gt": {"$regex": "^C"}}},
    {"$and": {"modality": "CT"}},
    {"$and": []},
    {"$and": ["modality"]},
    {"$nor": [{"modality": "CT"}]},
    {"$or": [{"modality": "CT"}, {"bad": 1}]},
    {"seriesDate": {"$date": "yesterday"}},
    {"seriesDate": {"$date": True}},
    {"seriesDate": {"$date": {"$numberLong": "soon"}}},
    {"seriesDate": {"$date": 10 ** 20}},
])
def test_bad_filter(get, flt):
    res = get("series", flt)
    assert res.status_code == 400
    assert res.get_json() == {"error": "Bad filter."}


def test_patient_info_needs_the_privilege(get, app):
    flt = {"$or": [{"modality": "XA"}, {"patientInfo.age": 30}]}
    res = get("series", flt, who="guest")
    assert res.status_code == 400
    assert res.get_json() == {"error": "You cannot search using patient information."}
    assert uids(get, flt) == ["1.1"]
    # the allow-list is checked first
    res = get("series", {"patientInfo.age": 30, "secret": 1}, who="guest")
    assert res.get_json() == {"error": "Bad filter."}


# --- operators ------------------------------------------------------------------------------

@pytest.mark.parametrize("flt, expected", [
    ({"modality": "CT"}, ["1.1", "1.2"]),
    ({"modality": "ct"}, []),  # equality is case-sensitive
    ({"width": 256}, ["1.3", "1.4"]),
    ({"width": 256.0}, ["1.3", "1.4"]),
    ({"width": "256"}, []),  # never across types, as in MongoDB
    ({"width": True}, []),
    ({"patientInfo.age": {"$gte": 50, "$lt": 70}}, ["1.2", "1.4"]),
    ({"patientInfo.age": {"$gt": 50}}, ["1.2", "1.3"]),
    ({"patientInfo.age": {"$lte": 42}}, ["1.1", "1.5"]),
    ({"patientInfo.age": {"$gt": "50"}}, []),
    ({"modality": {"$ne": "CT"}}, ["1.3", "1.4", "1.5"]),
    ({"modality": {"$ne": 5}}, ["1.1", "1.2", "1.3", "1.4", "1.5"]),
    ({"seriesDate": {"$ne": {"$date": "2023-01-05T00:00:00Z"}}}, ["1.2", "1.3", "1.4", "1.5"]),
    ({"modality": {"$in": ["MR", "CR", 3]}}, ["1.3", "1.4", "1.5"]),
    ({"modality": {"$in": []}}, []),
    ({"modality": {"$in": [{"$regex": "^C"}]}}, ["1.1", "1.2", "1.5"]),
    ({"modality": {"$all": ["CT"]}}, ["1.1", "1.2"]),
    ({"modality": {"$all": ["CT", "MR"]}}, []),
    ({"$and": [{"modality": "MR"}, {"width": 256}]}, ["1.3", "1.4"]),
    ({"$or": [{"modality": "CR"}, {"patientInfo.sex": "F"}]}, ["1.1", "1.3", "1.5"]),
    ({"$or": [{"$and": [{"modality": "CT"}, {"patientInfo.age": {"$gt": 40}}]},
              {"seriesUid": "1.5"}]}, ["1.2", "1.5"]),
    ({"modality": "MR", "patientInfo.sex": "M"}, ["1.4"]),
])
def test_operators(get, flt, expected):
    assert uids(get, flt) == expected


@pytest.mark.parametrize("date, expected", [
    ({"$date": "2023-01-01T00:00:00Z"}, ["1.1", "1.2", "1.3"]),
    ({"$date": "2023-01-01T09:00:00+09:00"}, ["1.1", "1.2", "1.3"]),
    ({"$date": "2023-01-01"}, ["1.1", "1.2", "1.3"]),
    ({"$date": 1672531200000}, ["1.1", "1.2", "1.3"]),
    ({"$date": {"$numberLong": "1672531200000"}}, ["1.1", "1.2", "1.3"]),
    ({"$date": "2022-12-31T22:00:00.000Z"}, ["1.1", "1.2", "1.3", "1.4"]),
])
def test_date_forms(get, date, expected):
    assert uids(get, {"seriesDate": {"$gte": date}}) == expected


def test_date_ranges_and_equality(get):
    flt = {"$and": [{"seriesDate": {"$gte": {"$date": "2023-01-01T00:00:00Z"}}},
                    {"seriesDate": {"$lt": {"$date": "2023-02-01T00:00:00Z"}}}]}
    assert uids(get, flt) == ["1.1", "1.2"]
    assert uids(get, {"seriesDate": {"$date": "2023-01-05T00:00:00.000Z"}}) == ["1.1"]
    assert uids(get, {"seriesDate": "2023-01-05T00:00:00.000Z"}) == []  # a string is no date
    assert uids(get, {"createdAt": {"$lt": {"$date": "2000-01-01T00:00:00Z"}}}) == []


# --- $regex as LIKE -------------------------------------------------------------------------

@pytest.mark.parametrize("regex, expected", [
    ({"$regex": "Anzu"}, ["1.1"]),
    ({"$regex": "anzu", "$options": "i"}, ["1.1", "1.3"]),
    ({"$regex": "^Anzu"}, ["1.1"]),
    ({"$regex": "Kato$"}, ["1.2"]),
    ({"$regex": "kato$", "$options": "i"}, ["1.2", "1.3"]),
    ({"$regex": "^Dan$"}, ["1.5"]),
    ({"$regex": "^an$"}, []),
    ({"$regex": "Chris\\^Doe"}, ["1.4"]),
    ({"$regex": "a"}, ["1.1", "1.2", "1.3", "1.5"]),
    ({"$regex": ""}, ["1.1", "1.2", "1.3", "1.4", "1.5"]),
])
def test_regex_on_names(get, regex, expected):
    assert uids(get, {"patientInfo.patientName": regex}) == expected


@pytest.mark.parametrize("regex, expected", [
    ("5%_off", ["1.1"]),  # % and _ are literals, not LIKE wildcards
    ("%", ["1.1"]),
    ("t%o", []),  # as a LIKE wildcard it would match "Chest 5%_off"
    ("e_t", []),  # as a LIKE wildcard it would match "Chest"
    ("\\(T2\\)", ["1.4"]),
    ("C:\\\\path", ["1.5"]),  # an escaped backslash
    ("C:\\\\", ["1.5"]),
    ("path\\\\$", []),  # literal backslash, then the end anchor
    ("Head \\(T2\\)$", ["1.4"]),
])
def test_regex_literals(get, regex, expected):
    assert uids(get, {"seriesDescription": {"$regex": regex}}) == expected


@pytest.mark.parametrize("pattern", [
    "a.b", "a*", "a+", "a?", "(a)", "[ab]", "a{2}", "a|b", "\\d", "\\w+", "\\", "^a.*$",
    "\\bword", "x\\Ay", ".*", "(?i)a",
])
def test_real_regular_expressions_are_refused(get, pattern):
    res = get("series", {"seriesDescription": {"$regex": pattern}})
    assert res.status_code == 400
    assert res.get_json() == {"error": "Only escaped literal regular expressions are supported."}


@pytest.mark.parametrize("options", ["m", "x", "s", "ig", "g"])
def test_regex_options(get, options):
    res = get("series", {"seriesDescription": {"$regex": "Head", "$options": options}})
    assert res.status_code == 400
    assert res.get_json() == {"error": "Unsupported regular expression option."}


def test_regex_on_non_text_fields_never_matches(get):
    assert uids(get, {"width": {"$regex": "512"}}) == []
    assert uids(get, {"seriesDate": {"$regex": "2023"}}) == []
    assert uids(get, {"patientInfo.age": {"$in": [{"$regex": "3"}, 55]}}) == ["1.2"]


def test_regex_to_like():
    assert regex_to_like(Regex("^a\\.b")) == ("a.b%", False)
    assert regex_to_like(Regex("50%", "i")) == ("%50\\%%", True)
    assert regex_to_like(Regex("x_y$")) == ("%x\\_y", False)
    assert regex_to_like(Regex("\\$$")) == ("%$", False)
    assert regex_to_like(Regex("\\\\$")) == ("%\\\\", False)


# --- array fields ---------------------------------------------------------------------------

@pytest.mark.parametrize("flt, expected", [
    ({"tags": "urgent"}, ["c1", "c4"]),
    ({"tags": "lung"}, ["c1", "c2"]),
    ({"tags": "none"}, []),
    ({"tags": {"$in": ["urgent", "none"]}}, ["c1", "c4"]),
    ({"tags": {"$all": ["urgent", "lung"]}}, ["c1"]),
    ({"tags": {"$all": []}}, ["c1", "c2", "c3", "c4"]),
    ({"tags": {"$ne": "urgent"}}, ["c2", "c3"]),
    ({"tags": {"$regex": "^lu"}}, ["c1", "c2"]),
    ({"tags": {"$regex": "URG", "$options": "i"}}, ["c1", "c4"]),
    ({"$or": [{"tags": "lung"}, {"caseId": "c3"}]}, ["c1", "c2", "c3"]),
    ({"tags": {"$gt": "m"}}, ["c1", "c4"]),
])
def test_array_field(get, flt, expected):
    assert uids(get, flt, "cases") == expected


def test_array_field_is_not_sortable(get):
    assert uids(get, None, "cases", sort='{"tags": -1}') == ["c1", "c2", "c3", "c4"]


# --- hostile input --------------------------------------------------------------------------

@pytest.fixture
def statements(app):
    """SQL statements executed while the block runs (to prove nothing reached the table)."""
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)
    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("text, message", [
    ('{"$where": "this.modality == \'CT\'"}', "Bad filter."),
    ('{"modality": {"$where": "1"}}', "Bad filter."),
    ('{"a; DROP TABLE series; --": 1}', "Bad filter."),
    ('{"modality\'; DROP TABLE series; --": "CT"}', "Bad filter."),
    ('{"modality": {"$function": {"body": "x"}}}', "Bad filter."),
    ('{"$expr": {"$eq": [1, 1]}}', "Bad filter."),
    ('{"modality": {"$regex": "(a+)+$"}}',
     "Only escaped literal regular expressions are supported."),
    ('{"__class__": 1}', "Bad filter."),
    ("[" * 3000 + "]" * 3000, "The filter is nested too deeply (at most 8 levels)."),
    ('{"modality": ' + "[" * 3000 + "]" * 3000 + "}",
     "The filter is nested too deeply (at most 8 levels)."),
    ('{"$and": [' * 9 + '{"modality": "CT"}' + "]}" * 9,
     "The filter is nested too deeply (at most 8 levels)."),
    (json.dumps({"modality": {"$in": ["CT"] * 1001}}), "Too many values in $in (at most 1000)."),
    (json.dumps({"modality": {"$all": ["CT"] * 1001}}), "Too many values in $all (at most 1000)."),
    (json.dumps({"$or": [{"modality": "x" * 20000}]}),
     "The filter is too large (at most 16384 characters)."),
])
def test_hostile_filters_execute_nothing(app, get, statements, text, message):
    res = get("series", text)
    assert res.status_code == 400
    assert res.get_json() == {"error": message}
    assert not [s for s in statements if re.search(r"\bseries\b", s)]
    with app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(Series)).scalar() == 5


def test_deep_nesting_within_the_limit_works(get):
    flt = {"modality": "CT"}
    for _ in range(7):
        flt = {"$and": [flt]}
    assert uids(get, flt) == ["1.1", "1.2"]


def test_in_at_the_limit_works(get):
    assert uids(get, {"modality": {"$in": ["x"] * 999 + ["MR"]}}) == ["1.3", "1.4"]


def test_values_are_bound_parameters(get, statements):
    """Quotes and SQL in values are data: they only fail to match."""
    for value in ["CT' OR '1'='1", "CT\"; DROP TABLE series; --", "%", "\\"]:
        assert uids(get, {"modality": value}) == []
        assert uids(get, {"modality": {"$regex": value.replace("\\", "\\\\")}}) == []
    assert not [s for s in statements if "DROP" in s.upper()]


def test_huge_numbers(get):
    assert uids(get, {"width": 10 ** 30}) == []
    assert uids(get, {"width": {"$lt": 10 ** 30}}) == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert uids(get, {"width": {"$gt": -10 ** 30}}) == ["1.1", "1.2", "1.3", "1.4", "1.5"]
    assert uids(get, {"width": 1e300}) == []
    assert uids(get, '{"width": {"$lt": 1e400}}') == ["1.1", "1.2", "1.3", "1.4", "1.5"]


# --- compile_filter directly ----------------------------------------------------------------

def test_compile_filter_directly(app):
    with app.test_request_context():
        condition = compile_filter('{"$or": [{"modality": "MR"}, {"width": {"$gt": 600}}]}',
                                   SERIES_FIELDS, patient_info_allowed=False)
        rows = db.session.execute(db.select(Series.series_uid).where(condition)
                                  .order_by(Series.series_uid)).scalars().all()
        assert rows == ["1.3", "1.4", "1.5"]
        with pytest.raises(Exception) as info:
            compile_filter('{"patientInfo.sex": "F"}', SERIES_FIELDS, patient_info_allowed=False)
        assert info.value.status == 400
        assert info.value.message == "You cannot search using patient information."
        with pytest.raises(Exception) as info:
            compile_filter("{bad", SERIES_FIELDS, parse_error="Filter string could not be parsed.")
        assert info.value.message == "Filter string could not be parsed."


def test_compiled_sql_has_no_user_text(app):
    hostile = "x'); DROP TABLE series; --"
    with app.test_request_context():
        condition = compile_filter(json.dumps({"modality": hostile}), SERIES_FIELDS,
                                   patient_info_allowed=True)
        sql = str(db.select(Series.series_uid).where(condition).compile(db.engine))
    assert "DROP" not in sql and hostile not in sql
