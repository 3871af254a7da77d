"""GET /api/series reads rows as text (dates as ISO strings, JSON columns as stored text,
models.Series.document_columns(as_text=True)): its documents are exactly those of
Series.to_json, whatever the stored values, on SQLite and PostgreSQL."""
import json
import math
from datetime import datetime

import pytest
import sqlalchemy as sa

import json_codec
from cli import create_initial_data
from models import GROUPS_STAMP, Series, SystemState, User, db
from tests.factories import make_series

BIG = 2 ** 70 + 1
NEGATIVE_19_DIGITS = -9999999999999999999  # below -2**63: orjson alone reads a float


def listed(client, headers, **params):
    res = client.get("/api/series", query_string={"sort": '{"seriesUid": 1}', **params},
                     headers=headers)
    assert res.status_code == 200
    return res


def documents(app, with_patient_info=True):
    """The documents of every series from ORM objects (decoded values), as the API
    encodes them."""
    with app.app_context():
        rows = db.session.execute(db.select(Series).order_by(Series.series_uid)).scalars()
        docs = [s.to_json(with_patient_info) for s in rows]
        return json.loads(app.json.response(docs).get_data())


def test_list_documents_equal_to_json(app, client, auth_headers):
    with app.app_context():
        make_series("1.2.3.1", series_date=datetime(2024, 2, 3, 4, 5, 6, 789999),
                    created_at=datetime(2023, 1, 1, 0, 0, 0, 0),
                    updated_at=datetime(999, 12, 31, 23, 59, 59, 1000),
                    parameters={"KVP": 120.5, "text": "胸部 CT \"q\"", "nested": [1, {"a": None}],
                                "f": 1e16, "small": 5e-324},
                    patient_info={"patientId": "P1", "patientName": "Sato^Anzu", "age": 30,
                                  "sex": "F"})
        make_series("1.2.3.2", series_date=None, parameters={}, patient_info={})
        db.session.commit()
    res = listed(client, auth_headers["alice"])
    items = res.json["items"]
    assert items == documents(app)
    assert items[0]["seriesDate"] == "2024-02-03T04:05:06.789Z"  # truncated, as isoformat
    assert items[0]["createdAt"] == "2023-01-01T00:00:00.000Z"
    assert items[0]["updatedAt"] == "0999-12-31T23:59:59.001Z"
    assert items[1]["seriesDate"] is None and items[1]["patientInfo"] == {}
    assert items[0]["parameters"]["text"] == "胸部 CT \"q\""


def test_list_masks_patient_info_read_as_text(app, client, auth_headers):
    with app.app_context():
        make_series("1.2.3.1", patient_info={"patientId": "SECRET", "patientName": "Hidden"})
        db.session.get(User, "alice@example.com").preferences = {"personalInfoView": False}
        db.session.commit()
    res = listed(client, auth_headers["alice"])
    assert res.json["items"] == documents(app, with_patient_info=False)
    assert "patientInfo" not in res.json["items"][0] and b"SECRET" not in res.data
    res = listed(client, auth_headers["bob"])  # personalInfoView and no preference against it
    assert res.json["items"][0]["patientInfo"]["patientId"] == "SECRET"


def test_list_keeps_long_integers_exact(app, client, auth_headers):
    """A long integer in one series sends the whole answer through the standard library;
    the other series' stored text is then decoded for it (json_codec.StoredJson)."""
    with app.app_context():
        make_series("1.2.3.1", parameters={"n": BIG, "m": NEGATIVE_19_DIGITS, "x": 1.5})
        make_series("1.2.3.2", parameters={"KVP": 120}, patient_info={"patientId": "P2"})
        db.session.commit()
    res = listed(client, auth_headers["alice"])
    items = res.json["items"]
    assert items[0]["parameters"] == {"n": BIG, "m": NEGATIVE_19_DIGITS, "x": 1.5}
    assert str(BIG).encode() in res.data and str(NEGATIVE_19_DIGITS).encode() in res.data
    assert items[1]["parameters"] == {"KVP": 120} and items[1]["patientInfo"] == {"patientId": "P2"}
    assert items == documents(app)


def test_list_writes_stored_nan_as_null(app, client, auth_headers):
    """The standard library stores NaN and Infinity (SQLite keeps them; PostgreSQL's json
    type refuses them); the answer has null, as orjson writes a decoded NaN."""
    with app.app_context():
        if db.engine.dialect.name != "sqlite":
            pytest.skip("PostgreSQL's json type cannot store NaN")
        make_series("1.2.3.1", parameters={"v": math.nan, "w": math.inf, "x": -math.inf,
                                           "word": "NaN"})
        db.session.commit()
    res = listed(client, auth_headers["alice"])
    assert res.json["items"][0]["parameters"] == {"v": None, "w": None, "x": None, "word": "NaN"}
    assert res.json["items"] == documents(app)


def test_list_reads_dates_stored_in_another_format(app, client, auth_headers):
    """A date SQLAlchemy did not write (no microseconds) is read as DateTime reads it."""
    with app.app_context():
        if db.engine.dialect.name != "sqlite":
            pytest.skip("only SQLite stores dates as text")
        make_series("1.2.3.1")
        db.session.commit()
        db.session.execute(sa.update(Series.__table__).values(
            series_date=sa.literal_column("'2024-05-06 07:08:09'"),
            created_at=sa.literal_column("'2024-05-06'")))
        db.session.commit()
    items = listed(client, auth_headers["alice"]).json["items"]
    assert items[0]["seriesDate"] == "2024-05-06T07:08:09.000Z"
    assert items[0]["createdAt"] == "2024-05-06T00:00:00.000Z"
    assert items == documents(app)


def test_stored_json_passes_plain_objects_only():
    assert isinstance(json_codec.stored_json('{"a": 1}'), json_codec.StoredJson)
    assert json_codec.stored_json(None) is None
    assert json_codec.stored_json("null") is None
    assert json_codec.stored_json("[1]") == [1]
    assert json_codec.stored_json(f'{{"n": {BIG}}}') == {"n": BIG}
    assert json_codec.stored_json(f'{{"n": {NEGATIVE_19_DIGITS}}}') == {"n": NEGATIVE_19_DIGITS}
    assert math.isnan(json_codec.stored_json('{"v": NaN}')["v"])
    assert json_codec.stored_json('{"v": -Infinity}') == {"v": -math.inf}


def test_stored_json_in_answers(app):
    """Embedded as stored by orjson; decoded when the standard library writes the answer."""
    stored = json_codec.StoredJson('{"a": [1, 2.5]}')
    with app.test_request_context():
        assert json.loads(app.json.response({"x": stored}).get_data()) == {"x": {"a": [1, 2.5]}}
        body = app.json.response({"x": stored, "big": BIG}).get_data()
    assert json.loads(body) == {"x": {"a": [1, 2.5]}, "big": BIG}


def test_init_db_gives_an_upgraded_database_a_groups_stamp(app, client, auth_headers):
    """A database whose groups predate groupsStamp gets one from init-db, so that a list
    request reuses the caller's privileges instead of querying the groups each time."""
    with app.app_context():
        db.session.delete(db.session.get(SystemState, GROUPS_STAMP))
        db.session.commit()
        create_initial_data()
        assert db.session.get(SystemState, GROUPS_STAMP).value
    queries = []
    with app.app_context():
        sa.event.listen(db.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    listed(client, auth_headers["alice"])
    queries.clear()
    listed(client, auth_headers["alice"])
    assert not [q for q in queries if "FROM groups" in q]
