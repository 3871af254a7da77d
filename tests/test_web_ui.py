"""The web UI on the same origin (CIRCUS_WEB_UI_DIR): files, index.html fallback, no escape."""
import pytest

from app import create_app

INDEX = b'<!DOCTYPE html><html><body><div id="app"></div><script src="/application.js">'
APPLICATION = b"console.log('circus');"
NOT_FOUND = {"error": "Not found"}


@pytest.fixture
def ui_dir(tmp_path):
    """A small stand-in for a built circus-web-ui folder, beside a secret it must not leak."""
    folder = tmp_path / "web-ui"
    (folder / "assets" / "fonts").mkdir(parents=True)
    (folder / "index.html").write_bytes(INDEX)
    (folder / "application.js").write_bytes(APPLICATION)
    (folder / "worker.js").write_bytes(b"onmessage = () => {};")
    (folder / "assets" / "fonts" / "glyph.woff").write_bytes(b"wOFF\x00\x01")
    (folder / ".htaccess").write_bytes(b"RewriteEngine On")
    (tmp_path / "secret.txt").write_bytes(b"do not serve")
    return folder


@pytest.fixture
def app_config(ui_dir):
    return {"WEB_UI_DIR": str(ui_dir)}


@pytest.mark.parametrize("path", ["/", "/home", "/browse/series", "/case-detail/01abc",
                                  "/admin/projects/", "/no-such-file.js", "/apis", "/rsx/y",
                                  "/loginx", "/Cases/List"])
def test_ui_routes_answer_index_html(client, path):
    res = client.get(path)
    assert res.status_code == 200
    assert res.data == INDEX
    assert res.mimetype == "text/html"
    assert "no-cache" in res.headers["Cache-Control"]
    assert res.headers["ETag"]


@pytest.mark.parametrize("path, body, mimetype", [
    ("/application.js", APPLICATION, "text/javascript"),
    ("/worker.js", b"onmessage = () => {};", "text/javascript"),
    ("/assets/fonts/glyph.woff", b"wOFF\x00\x01", "font/woff"),
    ("/index.html", INDEX, "text/html"),
])
def test_files_are_served_with_validators_and_max_age(client, path, body, mimetype):
    res = client.get(path)
    assert res.status_code == 200
    assert (res.data, res.mimetype) == (body, mimetype)
    assert res.headers["Last-Modified"] and res.headers["ETag"]
    assert "max-age=3600" in res.headers["Cache-Control"]
    again = client.get(path, headers={"If-None-Match": res.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""


def test_head_is_answered(client):
    res = client.head("/application.js")
    assert res.status_code == 200 and res.data == b""
    assert int(res.headers["Content-Length"]) == len(APPLICATION)


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_only_get_and_head(client, method):
    res = getattr(client, method)("/home")
    assert res.status_code == 405
    assert res.get_json() == {"error": "Method Not Allowed"}


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/assets/../../secret.txt",
    "/assets/%2e%2e/%2e%2e/secret.txt", "/..%2fsecret.txt", "/.htaccess", "/assets/.hidden",
])
def test_no_path_leaves_the_folder(client, path):
    res = client.get(path)
    assert b"do not serve" not in res.data
    assert (res.status_code, res.get_json()) == (404, NOT_FOUND)


def test_symlink_out_of_the_folder_is_refused(client, ui_dir):
    (ui_dir / "escape.txt").symlink_to(ui_dir.parent / "secret.txt")
    res = client.get("/escape.txt")
    assert (res.status_code, res.get_json()) == (404, NOT_FOUND)


@pytest.mark.parametrize("path, error", [
    ("/api", NOT_FOUND), ("/api/", NOT_FOUND), ("/api/nothing", NOT_FOUND),
    ("/API/Nothing", NOT_FOUND), ("/rs", NOT_FOUND), ("/RS/x", NOT_FOUND),
    ("/rs/series/1.2.3/metadata", {"error": "Series could not be loaded"})])  # the image server
def test_api_and_rs_paths_are_not_the_ui(client, path, error):
    res = client.get(path)
    assert (res.status_code, res.get_json()) == (404, error)


def test_api_keeps_its_token_check_and_routing(client, auth_headers):
    res = client.get("/api/login-info")
    assert res.status_code == 401
    res = client.get("/API/Login-Info", headers=auth_headers["bob"])
    assert res.get_json() == {"userEmail": "bob@example.com", "loginId": "bob"}
    assert client.get("/api/status").status_code == 200
    # a GET to an /api path routed only for other methods is still a 405, not the UI
    assert client.get("/api/tokens/x", headers=auth_headers["bob"]).status_code == 405
    assert client.get("/api/admin/plugin-job-manager/switch",
                      headers=auth_headers["alice"]).status_code == 405
    assert client.get("/login").status_code == 405
    assert client.get("/Login").status_code == 405


def test_the_ui_needs_no_token(client):
    assert client.get("/", headers={"Authorization": "Bearer nonsense"}).status_code == 200


@pytest.mark.parametrize("app_config", [{}])
@pytest.mark.parametrize("method, path", [("get", "/"), ("get", "/home"), ("head", "/"),
                                          ("get", "/application.js"), ("post", "/home")])
def test_unset_means_404_as_before(client, method, path):
    res = getattr(client, method)(path)
    assert res.status_code == 404
    if method != "head":
        assert res.get_json() == NOT_FOUND


def test_a_folder_without_index_html_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no index.html"):
        create_app({"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path / "data"),
                    "WEB_UI_DIR": str(tmp_path / "empty")})
