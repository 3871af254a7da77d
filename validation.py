"""Request bodies: strict JSON parsing and JSON-schema validation with CIRCUS's errors.

``decode_json`` is the one decoder of JSON sent by clients (bodies, ``filter`` and ``sort``):
standard JSON only (no NaN or Infinity) and at most ``JSON_MAX_DEPTH`` levels deep, measured
by a linear scan before the recursive parser runs.

Schemas live in ``schemas/<name>.yaml`` (named as on the wire) and are loaded once; a schema
may ``$ref`` another file by its file name (``pvd.yaml``). ``@expects`` validates the body
and passes it to the view as ``body``; the schema is also what /api/openapi.json publishes.
"""
import functools
import json
import os
import re
from itertools import accumulate

import yaml
from flask import current_app, request
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from errors import ApiError

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")

# A string literal (an unterminated one runs to the end, so every match succeeds at once and
# the scan stays linear), or a run of anything that is neither a bracket nor a quote.
_NOT_A_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[^\[\]{}"]+', re.S)
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class JsonTooDeep(ValueError):
    """Raised when JSON nests more containers than allowed."""


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def json_depth(text):
    """Deepest nesting of brackets outside string literals (0 for a scalar), without
    parsing: one pass over ``text``, no recursion."""
    skeleton = _NOT_A_BRACKET.sub("", text)
    if not skeleton:
        return 0
    return max(0, max(accumulate(map(_BRACKET_STEP.__getitem__, skeleton))))


def decode_json(text, max_depth=None, parse_int=None):
    """Decode JSON sent by a client.

    Parameters
    ----------
    text : str or bytes
        The document; bytes must be UTF-8.
    max_depth : int, optional
        Deepest container nesting allowed; defaults to the ``JSON_MAX_DEPTH`` setting.
    parse_int : callable, optional
        Passed to ``json.loads``.

    Raises
    ------
    JsonTooDeep
        When nested deeper than ``max_depth``; checked before parsing, so the recursive
        parser never goes deep.
    ValueError
        When not JSON: bad syntax or UTF-8, or NaN, Infinity and -Infinity.
    """
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if max_depth is None:
        max_depth = current_app.config["JSON_MAX_DEPTH"]
    if json_depth(text) > max_depth:
        raise JsonTooDeep(f"Nested more than {max_depth} levels deep")
    return json.loads(text, parse_int=parse_int, parse_constant=_reject_constant)


@functools.cache
def _registry():
    resources = []
    for name in sorted(os.listdir(SCHEMA_DIR)):
        if name.endswith(".yaml"):
            with open(os.path.join(SCHEMA_DIR, name), encoding="utf-8") as fh:
                resources.append((name, Resource.from_contents(yaml.safe_load(fh), DRAFT7)))
    return Registry().with_resources(resources)


def load_schema(name):
    """The schema stored in schemas/<name>.yaml."""
    return _registry()[name if name.endswith(".yaml") else name + ".yaml"].contents


@functools.cache
def _validator_for_name(name):
    return Draft7Validator(load_schema(name), registry=_registry())


def _validator(schema):
    if isinstance(schema, str):
        return _validator_for_name(schema)
    return Draft7Validator(schema, registry=_registry())


def _ajv_error(error):
    """One jsonschema error in the Ajv v6 shape CIRCUS clients display."""
    data_path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    params = {}
    if error.validator == "enum":
        params = {"allowedValues": error.validator_value}
    elif error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        params = {"additionalProperty": extra[0] if extra else None}
    elif error.validator == "required":
        params = {"missingProperty": error.message.split("'")[1] if "'" in error.message else None}
    elif error.validator in ("type", "format", "pattern", "minimum", "maximum", "minLength",
                             "maxLength", "minItems", "maxItems", "const"):
        params = {error.validator: error.validator_value}
    return {"keyword": error.validator, "dataPath": data_path,
            "schemaPath": "#/" + "/".join(str(p) for p in error.relative_schema_path),
            "params": params, "message": error.message}


def validate(instance, schema):
    """Raise ApiError 400 "Request data is not correct." unless instance matches schema."""
    errors = sorted(_validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        raise ApiError(400, "Request data is not correct.",
                       validationErrors=[_ajv_error(e) for e in errors])
    return instance


def json_body():
    """The request body parsed as strict JSON (an object or an array), else ApiError 400."""
    raw = request.get_data(cache=True)
    if len(raw) > current_app.config["JSON_BODY_MAX_BYTES"]:
        raise ApiError(400, "Invalid JSON as request body.\nrequest entity too large")
    try:
        value = decode_json(raw)
    except ValueError as exc:
        raise ApiError(400, f"Invalid JSON as request body.\n{exc}") from None
    if not isinstance(value, (dict, list)):
        raise ApiError(400, "Invalid JSON as request body.\nNot an object or an array")
    return value


def expects(schema, before=None):
    """Decorator: validate the JSON body against ``schema`` and pass it as ``body``.

    ``before(**view_kwargs)`` runs first, so that privilege checks answer before body
    validation as in CIRCUS (a bad body to a case the caller cannot write gives 401).
    """
    def decorate(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if before is not None:
                before(**kwargs)
            body = validate(json_body(), schema)
            return view(*args, body=body, **kwargs)
        wrapper.request_schema = schema
        return wrapper
    return decorate


def content_type(media_type):
    """Decorator: declare the media type a POST/PUT/PATCH view accepts (default JSON)."""
    def decorate(view):
        view.expected_content_type = media_type
        return view
    return decorate


def check_content_type():
    """before_request hook: CIRCUS's Content-Type check for POST, PUT and PATCH under /api."""
    if request.method not in ("POST", "PUT", "PATCH") or request.endpoint is None:
        return
    if not request.path.startswith("/api/"):
        return
    view = current_app.view_functions.get(request.endpoint)
    expected = getattr(view, "expected_content_type", "application/json")
    if not request.content_type:
        raise ApiError(400, "Content-type is unspecified.")
    if request.mimetype != expected:
        raise ApiError(415, f"This content-type is unsupported. Expected {expected}")
