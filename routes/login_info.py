"""Who am I: /api/login-info, /api/login-info/full, /api/logout."""
from flask import Blueprint, current_app, g, request

import accounts

bp = Blueprint("login_info", __name__, url_prefix="/api")


@bp.get("/login-info")
def get_login_info():
    """The caller's e-mail and login ID (clients use it to test a token)."""
    return {"userEmail": g.user.user_email, "loginId": g.user.login_id}


@bp.get("/login-info/full")
def get_login_info_full():
    """The caller's user document, computed privileges and the settings the web UI needs."""
    image_server = current_app.config["DICOM_IMAGE_SERVER_URL"] or request.host_url + "rs"
    return accounts.full_login_info(g.user, g.privileges, image_server)


@bp.get("/logout")
def get_logout():
    """Delete every session token of the caller; permanent tokens stay."""
    accounts.logout(g.user.user_email)
    return "", 204
