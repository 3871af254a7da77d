"""Public user profiles: GET /api/users/<userEmail>."""
import pytest


@pytest.mark.parametrize("who", ["guest", "bob", "alice"])
def test_any_user_sees_the_minimum(client, auth_headers, who):
    res = client.get("/api/users/alice@example.com", headers=auth_headers[who])
    assert res.status_code == 200
    doc = res.get_json()
    assert set(doc) == {"userEmail", "loginId", "description", "createdAt", "updatedAt"}
    assert doc["userEmail"] == "alice@example.com" and doc["loginId"] == "alice"
    assert doc["createdAt"].endswith("Z")


def test_unknown_user(client, auth_headers):
    res = client.get("/api/users/nobody@example.com", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested user was not found."}


def test_needs_token(client, tokens):
    res = client.get("/api/users/alice@example.com")
    assert res.status_code == 401
    assert res.get_json() == {"error": "Unauthorized request: no authentication given"}


def test_case_of_the_path_is_kept(client, auth_headers):
    """Routing is case-insensitive for literal segments only; e-mails keep their case."""
    res = client.get("/api/USERS/Alice@example.com", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested user was not found."}
    res = client.get("/api/Users/alice@example.com", headers=auth_headers["bob"])
    assert res.status_code == 200
