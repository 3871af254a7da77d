"""The one guard of /api/admin (routes/admin/__init__.py, auth.require_admin): every admin
route refuses a caller without manageServer, except the documented exceptions."""
import re

import pytest

from auth import ADMIN_EXCEPTIONS
from models import db
from tests.factories import make_group, make_token, make_user

REFUSAL = "You do not have sufficient privilege to access this resource."
# API.md 3.17: one-time URLs need issueOnetime instead.
DOCUMENTED_EXCEPTIONS = {("POST", "/api/admin/onetime-urls"): "issueOnetime"}


def admin_routes(app):
    """(method, concrete path, endpoint) of every rule under /api/admin."""
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/admin"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", "x", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, path, rule.endpoint


@pytest.fixture
def onetime_issuer(app):
    """Headers of a user holding issueOnetime only."""
    with app.app_context():
        group = make_group("issuers", privileges=["issueOnetime"])
        make_user("issuer@example.com", "issuer", groups=[group.group_id])
        db.session.commit()
        return {"Authorization": f"Bearer {make_token('issuer@example.com')}"}


def test_admin_routes_are_all_nested(app):
    routes = list(admin_routes(app))
    assert len(routes) >= 24  # API.md 58-81
    assert all(endpoint.startswith("admin.") for _, _, endpoint in routes)


@pytest.mark.parametrize("who", ["bob", "guest"])
def test_every_admin_route_needs_manage_server(app, client, auth_headers, who):
    for method, path, _ in admin_routes(app):
        needed = DOCUMENTED_EXCEPTIONS.get((method, path), "manageServer")
        res = client.open(path, method=method, json={}, headers=auth_headers[who])
        assert res.status_code == 401, (method, path)
        assert res.get_json() == {"error": REFUSAL + needed}, (method, path)


def test_issue_onetime_opens_only_its_route(app, client, onetime_issuer):
    for method, path, _ in admin_routes(app):
        res = client.open(path, method=method, json={"user": "bob"}, headers=onetime_issuer)
        if (method, path) in DOCUMENTED_EXCEPTIONS:
            assert res.status_code == 404, (method, path)  # past the guard: no such user
        else:
            assert res.status_code == 401, (method, path)
            assert res.get_json() == {"error": REFUSAL + "manageServer"}, (method, path)


def test_exceptions_name_real_blueprints(app):
    assert set(ADMIN_EXCEPTIONS) <= set(app.blueprints)
