"""The API description: /api/openapi.json and the docstring rule behind it."""
import re

import openapi


def test_every_api_route_has_a_docstring(app):
    """Each view's docstring is its OpenAPI summary; a route without one is undocumented."""
    offenders = openapi.undocumented(app)
    assert offenders == [], "Routes without a docstring:\n  " + "\n  ".join(offenders)


def test_undocumented_route_is_reported(app):
    @app.get("/api/undocumented-example")
    def undocumented_example():
        return {}

    @app.get("/api/documented-example/<int:number>")
    def documented_example(number):
        """Documented."""
        return {}

    offenders = openapi.undocumented(app)
    assert "GET /api/undocumented-example (undocumented_example)" in offenders
    assert not any("documented-example/" in o for o in offenders)


def test_needs_a_token(client):
    res = client.get("/api/openapi.json")
    assert res.status_code == 401
    assert res.get_json() == {"error": "Unauthorized request: no authentication given"}


def test_document(app, client, auth_headers):
    res = client.get("/api/openapi.json", headers=auth_headers["guest"])
    assert res.status_code == 200
    doc = res.get_json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    # every route of the app is there, with its summary
    for rule, method, endpoint, view in openapi.api_routes(app):
        path, _ = openapi.openapi_path(rule)
        operation = paths[path][method.lower()]
        assert operation["summary"] == view.__doc__.strip().splitlines()[0].strip()
        assert operation["responses"]
    group = paths["/api/admin/groups/{group_id}"]
    assert set(group) == {"get", "patch"}
    assert group["get"]["parameters"] == [{"name": "group_id", "in": "path", "required": True,
                                           "schema": {"type": "string"}}]
    assert group["patch"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/group"}
    assert "requestBody" not in group["get"]
    post = paths["/api/admin/groups"]["post"]
    assert post["summary"] == "Create a group; the server assigns the next group ID."
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/group-create"}
    # inline schemas are published inline
    put = paths["/api/admin/server-params/{key}"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"] == {
        "type": ["object", "array"]}


def test_security(client, auth_headers):
    doc = client.get("/api/openapi.json", headers=auth_headers["guest"]).get_json()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/api/status"]["get"]["security"] == []
    assert doc["paths"]["/login"]["post"]["security"] == []
    assert "security" not in doc["paths"]["/api/admin/users"]["get"]
    assert "security" not in doc["paths"]["/api/openapi.json"]["get"]


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(doc, ref):
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves(client, auth_headers):
    doc = client.get("/api/openapi.json", headers=auth_headers["guest"]).get_json()
    refs = set(_refs(doc))
    assert "#/components/schemas/preferences" in refs  # user.yaml -> preferences.yaml
    for ref in refs:
        _resolve(doc, ref)
    assert not any(ref.endswith(".yaml") for ref in refs)


def test_path_parameters_are_declared(client, auth_headers):
    doc = client.get("/api/openapi.json", headers=auth_headers["guest"]).get_json()
    for path, operations in doc["paths"].items():
        names = re.findall(r"{([^}]+)}", path)
        for operation in operations.values():
            declared = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
            assert declared == names, path


def test_converters():
    assert openapi.openapi_path("/a/<int:n>/<path:rest>") == ("/a/{n}/{rest}", [
        {"name": "n", "in": "path", "required": True, "schema": {"type": "integer"}},
        {"name": "rest", "in": "path", "required": True, "schema": {"type": "string"}}])
