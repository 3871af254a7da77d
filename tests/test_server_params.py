"""Server parameters: /api/admin/server-params."""

MANAGE_SERVER = "You do not have sufficient privilege to access this resource.manageServer"


def test_needs_manage_server(client, auth_headers):
    for method, path, body in [("get", "/api/admin/server-params", None),
                               ("get", "/api/admin/server-params/domains", None),
                               ("put", "/api/admin/server-params/domains", ["evil"]),
                               ("put", "/api/admin/server-params", {"defaultDomain": "evil"})]:
        res = getattr(client, method)(path, json=body, headers=auth_headers["bob"])
        assert (res.status_code, res.get_json()) == (401, {"error": MANAGE_SERVER}), (method, path)
    res = client.get("/api/admin/server-params", headers=auth_headers["alice"])
    assert res.get_json() == {"domains": ["default"]}


def test_initial_params(client, auth_headers):
    res = client.get("/api/admin/server-params", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.get_json() == {"domains": ["default"]}
    res = client.get("/api/admin/server-params/domains", headers=auth_headers["alice"])
    assert res.get_json() == ["default"]


def test_unknown_param(client, auth_headers):
    res = client.get("/api/admin/server-params/nothing", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested serverParam was not found."}


def test_put_one(client, auth_headers):
    headers = auth_headers["alice"]
    res = client.put("/api/admin/server-params/domains", json=["default", "sirius.org"],
                     headers=headers)
    assert res.status_code == 204 and res.data == b""
    res = client.put("/api/admin/server-params/colors", json={"a": [1, 2]}, headers=headers)
    assert res.status_code == 204
    assert client.get("/api/admin/server-params", headers=headers).get_json() == {
        "colors": {"a": [1, 2]}, "domains": ["default", "sirius.org"]}
    assert client.get("/api/admin/server-params/colors", headers=headers).get_json() == {
        "a": [1, 2]}


def test_put_one_needs_strict_json(client, auth_headers):
    res = client.put("/api/admin/server-params/defaultDomain", data='"default"',
                     content_type="application/json", headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"].startswith("Invalid JSON as request body.")


def test_put_bulk(client, auth_headers):
    headers = auth_headers["alice"]
    res = client.put("/api/admin/server-params", json={"defaultDomain": "default", "n": 3},
                     headers=headers)
    assert res.status_code == 204
    assert client.get("/api/admin/server-params", headers=headers).get_json() == {
        "defaultDomain": "default", "domains": ["default"], "n": 3}
    assert client.get("/api/admin/server-params/n", headers=headers).get_json() == 3


def test_known_params_are_checked(client, auth_headers):
    for path, body in [
        ("/api/admin/server-params", {"domains": "default"}),
        ("/api/admin/server-params", {"defaultDomain": ["a"]}),
        ("/api/admin/server-params", ["a"]),
        ("/api/admin/server-params/domains", {"a": 1}),
        ("/api/admin/server-params/defaultDomain", ["a"]),
        ("/api/admin/server-params/" + "k" * 129, ["a"]),
    ]:
        res = client.put(path, json=body, headers=auth_headers["alice"])
        assert res.status_code == 400, (path, body)
        assert res.get_json()["error"] == "Request data is not correct."
    assert client.get("/api/admin/server-params", headers=auth_headers["alice"]).get_json() == {
        "domains": ["default"]}


def test_wrong_content_type(client, auth_headers):
    res = client.put("/api/admin/server-params", data="{}", content_type="text/plain",
                     headers=auth_headers["alice"])
    assert res.status_code == 415
    assert res.get_json() == {"error": "This content-type is unsupported. Expected application/json"}
