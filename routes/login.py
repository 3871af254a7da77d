"""The OAuth2 token endpoint: POST /login (password and refresh-token grants)."""
from flask import Blueprint, request

import accounts
from errors import ApiError

bp = Blueprint("login", __name__)
CLIENT_ID = "circus-front"


def _client_credentials():
    """(client_id, client_secret, sent_as_basic) from the form or HTTP Basic auth."""
    if request.authorization and request.authorization.type == "basic":
        return request.authorization.username, request.authorization.password, True
    return request.form.get("client_id"), request.form.get("client_secret"), False


def _required(name):
    value = request.form.get(name)
    if not value:
        raise ApiError(400, f"Missing parameter: `{name}`")
    return value


@bp.post("/login")
def post_login():
    """Issue an access token (OAuth2 password or refresh_token grant, form-encoded)."""
    if request.mimetype != "application/x-www-form-urlencoded":
        raise ApiError(400, "Invalid request: content must be application/x-www-form-urlencoded")
    client_id, client_secret, basic = _client_credentials()
    if not client_id or not client_secret:
        raise ApiError(400, "Invalid client: cannot retrieve client credentials")
    if client_id != CLIENT_ID:
        raise ApiError(401 if basic else 400, "Invalid client: client is invalid")
    grant_type = _required("grant_type")
    ip = request.headers.get("X-Forwarded-For", request.remote_addr or "").split(",")[0].strip()
    if grant_type == "password":
        access, refresh, lifetime = accounts.password_grant(
            _required("username"), _required("password"), ip, client=request.remote_addr)
    elif grant_type == "refresh_token":
        access, refresh, lifetime = accounts.refresh_grant(_required("refresh_token"), ip)
    else:
        raise ApiError(400, "Unsupported grant type: `grant_type` is invalid")
    body = {"access_token": access, "token_type": "Bearer", "expires_in": lifetime,
            "refresh_token": refresh}
    return body, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}
