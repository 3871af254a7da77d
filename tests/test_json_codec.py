"""JSON through orjson (json_codec.py): the same answers and stored values as the standard
library, including what orjson alone would refuse or round."""
import datetime
import math

from flask import jsonify

import json_codec
from models import ServerParam, db


def test_stored_documents_decode_exactly():
    assert json_codec.loads_stored('{"a": [1, 2.5, "x", null, true]}') == {
        "a": [1, 2.5, "x", None, True]}
    big = 123456789012345678901234567890
    assert json_codec.loads_stored(f'{{"n": {big}}}') == {"n": big}  # not a float
    assert math.isnan(json_codec.loads_stored('{"v": NaN}')["v"])
    assert json_codec.loads_stored(b'[1]') == [1]
    assert json_codec.loads_stored(f'[{big}]'.encode()) == [big]  # bytes, as from psycopg
    assert json_codec.loads_stored(memoryview(f'[{big}]'.encode())) == [big]


def test_a_stored_big_integer_comes_back_exact_through_the_api(app, client, auth_headers):
    big = 2 ** 70 + 1
    with app.app_context():
        db.session.add(ServerParam(key="bigNumber", value={"n": big, "x": 1.5}))
        db.session.commit()
    res = client.get("/api/admin/server-params", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.get_json()["bigNumber"] == {"n": big, "x": 1.5}
    assert str(big).encode() in res.data


def test_responses_match_the_standard_provider(app, auth_headers):
    """Dates, integer keys, non-ASCII text and huge integers come out as Flask's own
    provider writes them (the last through its fallback)."""
    @app.get("/api/test-json-codec")
    def sample():
        return jsonify({"date": datetime.datetime(2024, 1, 2, 3, 4, 5), 1: "one",
                        "text": "胸部 CT", "big": 2 ** 70, "list": (1, 2)})

    client = app.test_client()
    res = client.get("/api/test-json-codec", headers=auth_headers["alice"])
    assert res.status_code == 200 and res.mimetype == "application/json"
    assert res.get_json() == {"date": "Tue, 02 Jan 2024 03:04:05 GMT", "1": "one",
                              "text": "胸部 CT", "big": 2 ** 70, "list": [1, 2]}
