"""The API description: an OpenAPI 3.1 document built from the app itself.

Paths and methods come from ``app.url_map``; each operation's summary is the first line of
its view's docstring (the rest becomes the description); a request body comes from the
``request_schema`` that ``validation.expects`` leaves on the view (or its declared media
type). Schemas are the files of ``schemas/``, published under ``components/schemas`` with
their file-name references rewritten to component references.
"""
import inspect
import os
import re

import auth
import validation

OPENAPI_VERSION = "3.1.0"
TITLE = "CIRCUS CS/DB API"
API_VERSION = "0.4"
IGNORED_METHODS = {"HEAD", "OPTIONS"}
WRITE_METHODS = {"POST", "PUT", "PATCH"}
_ARGUMENT = re.compile(r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?"
                       r"(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>")
_PARAMETER_TYPES = {"int": {"type": "integer"}, "float": {"type": "number"}}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string"},
                   "validationErrors": {"type": "array", "items": {"type": "object"}}}}


def schema_names():
    """Names of the JSON schemas in schemas/ (file names without .yaml)."""
    return sorted(name[:-5] for name in os.listdir(validation.SCHEMA_DIR)
                  if name.endswith(".yaml"))


def _component_ref(ref, base):
    """'group.yaml#/properties/x' -> '#/components/schemas/group/properties/x'; a local
    '#/definitions/x' of schema ``base`` -> '#/components/schemas/<base>/definitions/x'."""
    target, _, pointer = ref.partition("#")
    if target.endswith(".yaml"):
        return f"#/components/schemas/{target[:-5]}{pointer}"
    if not target and base is not None:
        return f"#/components/schemas/{base}{pointer}"
    return ref


def _rewrite_refs(schema, base=None):
    if isinstance(schema, dict):
        return {k: _component_ref(v, base) if k == "$ref" and isinstance(v, str)
                else _rewrite_refs(v, base) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rewrite_refs(v, base) for v in schema]
    return schema


def _schema_object(schema):
    if isinstance(schema, str):
        return {"$ref": f"#/components/schemas/{schema.removesuffix('.yaml')}"}
    return _rewrite_refs(schema)


def openapi_path(rule):
    """A Werkzeug rule as an OpenAPI path and its parameters: '/a/<int:id>' -> '/a/{id}'."""
    parameters = []

    def replace(match):
        schema = dict(_PARAMETER_TYPES.get(match.group("converter"), {"type": "string"}))
        parameters.append({"name": match.group("name"), "in": "path", "required": True,
                           "schema": schema})
        return "{" + match.group("name") + "}"
    return _ARGUMENT.sub(replace, rule), parameters


def _docstring(view):
    return inspect.getdoc(view) or ""


def _operation(endpoint, method, view, parameters):
    doc = _docstring(view)
    summary, _, description = doc.partition("\n")
    operation = {"operationId": f"{endpoint}.{method.lower()}",
                 # the innermost blueprint: /api/admin's children are nested in "admin"
                 "tags": [endpoint.split(".")[-2]], "summary": summary.strip()}
    if description.strip():
        operation["description"] = description.strip()
    if parameters:
        operation["parameters"] = parameters
    schema = getattr(view, "request_schema", None)
    media_type = getattr(view, "expected_content_type", None)
    if schema is not None or (media_type and method in WRITE_METHODS):
        content = {"schema": _schema_object(schema)} if schema is not None else {}
        operation["requestBody"] = {"required": True,
                                    "content": {media_type or "application/json": content}}
    if endpoint in auth.PUBLIC_ENDPOINTS:
        operation["security"] = []
    operation["responses"] = {
        "2XX": {"description": "Success (see API.md for the exact status and body)."},
        "default": {"description": "An error.", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}},
    }
    return operation


def api_routes(app):
    """(rule, method, endpoint, view) for every route of the app but static files."""
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - IGNORED_METHODS):
            yield rule.rule, method, rule.endpoint, app.view_functions[rule.endpoint]


def undocumented(app):
    """'METHOD /path (endpoint)' for every /api route whose view has no docstring."""
    return [f"{method} {rule} ({endpoint})" for rule, method, endpoint, view in api_routes(app)
            if rule.startswith("/api") and not _docstring(view).strip()]


def build(app):
    """The OpenAPI document of the app."""
    paths = {}
    for rule, method, endpoint, view in api_routes(app):
        path, parameters = openapi_path(rule)
        paths.setdefault(path, {})[method.lower()] = _operation(endpoint, method, view, parameters)
    schemas = {name: _rewrite_refs(validation.load_schema(name), name)
               for name in schema_names()}
    schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": TITLE, "version": API_VERSION,
                 "description": "Errors are JSON {\"error\": message}; most authorisation "
                                "failures answer 401 (CIRCUS compatibility)."},
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
    }
