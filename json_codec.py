"""JSON for responses and stored documents: orjson where it can, the standard library where
it cannot.

Decoding the JSON columns of a page of rows and encoding the answer are the largest costs
of a list request after the database; orjson does both several times faster. Whatever
orjson refuses (integers beyond 64 bits, NaN in a stored document, types it does not know)
goes through the standard library exactly as before, so no answer changes.
"""
import json
import re

import orjson
from flask.json.provider import DefaultJSONProvider

# Dates, dataclasses and non-string keys are handed to Flask's own conversions (passthrough),
# so the output matches the standard provider's.
_OPTIONS = (orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
            | orjson.OPT_PASSTHROUGH_DATACLASS)


# orjson reads an integer beyond 64 bits (and a negative one below -2**63, which may have
# only 19 digits) as a float; the standard library keeps it exact.
_LONG_NUMBER = re.compile(r"\d{19}")
_LONG_NUMBER_BYTES = re.compile(rb"\d{19}")


def loads_stored(text):
    """Decode a stored JSON document (SQLAlchemy's ``json_deserializer``): text from
    SQLite, bytes from psycopg."""
    if isinstance(text, memoryview):
        text = bytes(text)
    long_number = _LONG_NUMBER if isinstance(text, str) else _LONG_NUMBER_BYTES
    if long_number.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # e.g. NaN, which json.dumps writes and orjson refuses


class StoredJson:
    """A stored JSON object passed into an answer as its stored text, not decoded and
    encoded again (``stored_json``)."""
    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


def stored_json(text):
    """A JSON object column read as text, for an answer: ``StoredJson`` when orjson would
    read it exactly, else the decoded value (what ``loads_stored`` returns).

    The answer is then the same as from the decoded value: NaN and Infinity (which orjson
    writes as null) and long integers (which the standard-library fallback keeps exact) are
    decoded; so is anything but an object (``null``, for which callers substitute ``{}``).
    A false positive (the word NaN inside a string) only costs the decoding.
    """
    if text is None:
        return None
    if (text[:1] == "{" and "NaN" not in text and "Infinity" not in text
            and not _LONG_NUMBER.search(text)):
        return StoredJson(text)
    return loads_stored(text)


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON provider with orjson for compact output (``jsonify``, returned dicts)."""

    @staticmethod
    def default(o):
        """Flask's conversions, and ``StoredJson`` decoded (the standard-library path)."""
        if type(o) is StoredJson:
            return loads_stored(o.text)
        return DefaultJSONProvider.default(o)

    def _orjson_default(self, o):
        if type(o) is StoredJson:
            return orjson.Fragment(o.text)  # embedded as stored
        return self.default(o)

    def response(self, *args, **kwargs):
        if self.compact is False or (self.compact is None and self._app.debug):
            return super().response(*args, **kwargs)  # indented for people
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, default=self._orjson_default, option=_OPTIONS) + b"\n"
        except TypeError:
            return super().response(*args, **kwargs)
        return self._app.response_class(body, mimetype=self.mimetype)
