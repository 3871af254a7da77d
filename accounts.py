"""The caller's account: the OAuth2 grants, one-time strings, session tokens, preferences
and the login information the web UI loads at start-up."""
import copy
import logging
import secrets
from datetime import timedelta

from flask import current_app

import audit
from auth import check_password, digest, find_user, issue_login_token
from errors import ApiError, not_found
from models import (LoginThrottle, MyList, MyListEditor, OnetimeUrl, PluginDefinition, Project,
                    ServerParam, Token, User, db, insert_ignore, utcnow)
from plugins import definitions
from table_versions import app_memo

log = logging.getLogger(__name__)
ONETIME_LIFETIME = timedelta(seconds=60)
INVALID_CREDENTIALS = "Invalid grant: user credentials are invalid"
UPLOAD_FILE_MAX = 30  # advisory maximum number of files per upload in the web UI


def _logged_in(user, ip):
    user.last_login_time = utcnow()
    user.last_login_ip = ip
    tokens = issue_login_token(user.user_email)
    db.session.commit()
    return tokens


def _onetime_user(username, password):
    """The user of a valid one-time string (consumed), or None if it is not one."""
    row = db.session.execute(db.select(OnetimeUrl).where(
        OnetimeUrl.onetime_string_hash == digest(password))).scalar_one_or_none()
    if row is None:
        return None
    if username != password or row.created_at < utcnow() - ONETIME_LIFETIME:
        raise ApiError(400, INVALID_CREDENTIALS)
    db.session.delete(row)
    return db.session.get(User, row.user_email)


def password_grant(username, password, ip, client=None):
    """Check credentials (or a one-time string); return a new token triple.

    ``client`` is the address failures are throttled by (the connection's, never a header
    the caller chose). A throttled account or address answers 429 whatever the password.
    """
    known = find_user(username)
    account = known.user_email if known is not None else username[:254]
    keys = ["user:" + account] + (["ip:" + client] if client else [])
    wait = _throttled(keys)
    if wait:
        audit.record("login-throttled", "user", account, outcome="denied", user_email=account)
        db.session.commit()
        raise ApiError(429, "Too many failed logins: try again later.",
                       headers={"Retry-After": str(wait)})
    user = _onetime_user(username, password)
    if user is None:
        user = known
        if user is None or not check_password(user.password, password):
            _login_failed(keys, account)
    if not user.login_enabled:
        _login_failed(keys, account)
    _forgive(keys[0])
    audit.record("login", "user", user.user_email, user_email=user.user_email)
    return _logged_in(user, ip)


# --- login throttling -------------------------------------------------------------------

def _throttled(keys):
    """Seconds until the longest block of ``keys`` ends; 0 when none is blocked."""
    now = utcnow()
    rows = db.session.execute(db.select(LoginThrottle.blocked_until).where(
        LoginThrottle.key.in_(keys), LoginThrottle.blocked_until > now)).scalars().all()
    return max((int((until - now).total_seconds()) + 1 for until in rows), default=0)


def _login_failed(keys, account):
    """Count a failure against the account and the address (committed with its audit
    record, the answer being an error), then refuse."""
    db.session.rollback()  # a consumed one-time string stays unconsumed, as before
    config = current_app.config
    now = utcnow()
    window = timedelta(seconds=config["LOGIN_THROTTLE_WINDOW"])
    for key in keys:
        insert_ignore(db.session.connection(), LoginThrottle.__table__,
                             {"key": key, "failures": 0, "window_start": now})
        row = db.session.execute(db.select(LoginThrottle).where(LoginThrottle.key == key)
                                 .with_for_update()).scalar_one()
        if row.window_start < now - window:
            row.failures, row.window_start = 0, now
        row.failures += 1
        if row.failures >= config["LOGIN_THROTTLE_FAILURES"]:
            row.blocked_until = now + timedelta(seconds=config["LOGIN_THROTTLE_BLOCK"])
            row.failures, row.window_start = 0, now
    audit.record("login-failed", "user", account, outcome="failure", user_email=account)
    db.session.commit()
    raise ApiError(400, INVALID_CREDENTIALS)


def _forgive(key):
    """A successful login clears its account's failures (not its address's)."""
    db.session.execute(db.delete(LoginThrottle).where(LoginThrottle.key == key))


# --- the first start --------------------------------------------------------------------

DEFAULT_ADMIN = "circus"
DEFAULT_PASSWORD = "circus"


def default_password_in_use():
    """Whether the account ``circus`` still has the password init-db gave it (checked once
    per stored hash: a password check costs tens of milliseconds)."""
    user = find_user(DEFAULT_ADMIN)
    if user is None or not user.password:
        return False
    return app_memo("circus.default_password", 8).get(
        user.password, lambda: check_password(user.password, DEFAULT_PASSWORD))


def refresh_grant(refresh_token, ip):
    """Exchange a refresh token for a new pair; the old pair is deleted."""
    token = db.session.execute(db.select(Token).where(
        Token.refresh_token_hash == digest(refresh_token),
        Token.permanent_token_id.is_(None))).scalar_one_or_none()
    if token is None:
        raise ApiError(400, "Invalid grant: refresh token is invalid")
    if token.refresh_token_expires_at < utcnow():
        raise ApiError(400, "Invalid grant: refresh token has expired")
    user = db.session.get(User, token.user_email)
    db.session.delete(token)
    if user is None or not user.login_enabled:
        db.session.commit()
        raise ApiError(400, "Invalid grant: refresh token is invalid")
    return _logged_in(user, ip)


def logout(user_email):
    """Delete every session token of the user; permanent tokens stay."""
    db.session.execute(db.delete(Token).where(Token.user_email == user_email,
                                              Token.permanent_token_id.is_(None)))
    db.session.commit()


# --- clean-up ---------------------------------------------------------------------------

def clear_tokens(include_permanent=False, expired_only=False):
    """Delete session tokens (and permanent ones too if asked); return how many went.

    Parameters
    ----------
    include_permanent : bool
        Also delete permanent tokens (``clear-token --all``).
    expired_only : bool
        Keep tokens whose access token is still valid (housekeeping).
    """
    query = db.delete(Token)
    if not include_permanent:
        query = query.where(Token.permanent_token_id.is_(None))
    if expired_only:
        query = query.where(Token.access_token_expires_at < utcnow())
    count = db.session.execute(query).rowcount
    db.session.commit()
    return count


# --- one-time login strings -------------------------------------------------------------

ONETIME_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
ONETIME_LENGTH = 32


def issue_onetime(email_or_login_id):
    """Issue a one-time login string for the only user with that e-mail or login ID.

    Only the SHA-256 digest is stored; the clear string is returned once. Expired strings
    of any user are swept on the way (what CIRCUS's TTL index does).

    Raises
    ------
    ApiError
        404 "Not Found" unless exactly one user matches, 400 "Bad Request" if that user
        may not log in.
    """
    users = db.session.execute(db.select(User).where(db.or_(
        User.user_email == email_or_login_id, User.login_id == email_or_login_id))
        .limit(2)).scalars().all()
    if len(users) != 1:
        raise ApiError(404)
    if not users[0].login_enabled:
        raise ApiError(400)
    db.session.execute(db.delete(OnetimeUrl).where(
        OnetimeUrl.created_at < utcnow() - ONETIME_LIFETIME))
    onetime = "".join(secrets.choice(ONETIME_ALPHABET) for _ in range(ONETIME_LENGTH))
    db.session.add(OnetimeUrl(user_email=users[0].user_email, onetime_string_hash=digest(onetime)))
    db.session.commit()
    return onetime


# --- preferences ------------------------------------------------------------------------

DEFAULT_PREFERENCES = {
    "theme": "mode_white",
    "personalInfoView": False,
    "caseSearchPresets": [],
    "seriesSearchPresets": [],
    "pluginJobSearchPresets": [],
    "referenceLine": False,
    "initailAlphaForNewLabels": 1,  # sic: CIRCUS's spelling
    "interpolationMode": "nearestNeighbor",
    "windowPropagationScope": "all",
    "scrollBars": "none",
    "scrollBarsInfo": {},
    "maintainAspectRatio": False,
    "fixCenterOfGravity": False,
    "dimmedOutlineFor2DLabels": "show",
    "revisionMessageTemplates": [],
    "labelColors": {"useDefault": True, "customColors": []},
}


def default_preferences():
    """A fresh copy of the default preferences (API.md 4.9)."""
    return copy.deepcopy(DEFAULT_PREFERENCES)


def effective_preferences(user):
    """The defaults shallow-merged with the user's stored preferences."""
    return {**default_preferences(), **(user.preferences or {})}


def update_preferences(user, changes):
    """Shallow-merge validated ``changes`` into the user's stored preferences and commit."""
    user.preferences = {**(user.preferences or {}), **changes}
    db.session.commit()


# --- who am I ---------------------------------------------------------------------------

def public_profile(user_email):
    """What any user may see of another: e-mail, login ID, description, dates."""
    user = db.session.get(User, user_email)
    if user is None:
        raise not_found("user")
    return {"userEmail": user.user_email, "loginId": user.login_id,
            "description": user.description, **user.timestamps()}


def _by_id(model, key_column, ids):
    if not ids:
        return {}
    rows = db.session.execute(db.select(model).where(key_column.in_(ids))).scalars()
    return {getattr(row, key_column.key): row for row in rows}


def privilege_document(privileges):
    """The computed privilege object of API.md 2.3, with full project and plug-in documents.

    Projects or plug-ins that no longer exist are skipped (quirk 30). Remote plug-in secrets
    are left out, as in every answer to non-administrators.
    """
    projects = _by_id(Project, Project.project_id, list(privileges.project_roles))
    plugins = _by_id(PluginDefinition, PluginDefinition.plugin_id, list(privileges.plugin_roles))
    return {
        "domains": list(privileges.domains),
        "globalPrivileges": list(privileges.global_privileges),
        "accessibleProjects": [
            {"projectId": pid, "roles": list(roles), "project": projects[pid].to_json()}
            for pid, roles in privileges.project_roles.items() if pid in projects],
        "accessiblePlugins": [
            {"pluginId": pid, "roles": list(roles), "plugin": definitions.public_json(plugins[pid])}
            for pid, roles in privileges.plugin_roles.items() if pid in plugins],
    }


def shared_my_lists(user):
    """My lists of which the user is an editor, directly or through one of their groups."""
    group_ids = [gid for gid in (user.groups or []) if isinstance(gid, int)]
    editor = MyListEditor.user_email == user.user_email
    if group_ids:
        editor = db.or_(editor, MyListEditor.group_id.in_(group_ids))
    shared = db.select(MyListEditor.my_list_id).where(editor)
    rows = db.session.execute(db.select(MyList).where(MyList.my_list_id.in_(shared))
                              .order_by(MyList.created_at, MyList.my_list_id)).scalars()
    return [{"owner": row.user_email, "sharedMyList": row.to_json()} for row in rows]


def full_login_info(user, privileges, image_server_url):
    """GET /api/login-info/full: the user (no password), privileges and UI settings
    (``image_server_url`` is its ``dicomImageServer``)."""
    doc = user.to_json()
    doc["groups"] = list(privileges.group_names)
    own = db.session.execute(db.select(MyList).where(MyList.user_email == user.user_email)
                             .order_by(MyList.created_at, MyList.my_list_id)).scalars()
    doc["myLists"] = [row.to_json() for row in own]
    doc.update(privilege_document(privileges))
    param = db.session.get(ServerParam, "defaultDomain")
    default_domain = param.value if param is not None else None
    config = current_app.config
    doc.update({
        "defaultDomain": default_domain if default_domain in privileges.domains else None,
        "sharedMyLists": shared_my_lists(user),
        "dicomImageServer": image_server_url,
        "uploadFileMax": UPLOAD_FILE_MAX,
        "uploadFileSizeMaxBytes": config["UPLOAD_FILE_SIZE_MAX_BYTES"],
    })
    if privileges.has_global("manageServer"):
        doc["defaultPasswordInUse"] = default_password_in_use()
        if doc["defaultPasswordInUse"]:
            doc["warnings"] = [f'The account "{DEFAULT_ADMIN}" still has its default password: '
                               "change it (README, first steps)."]
    return doc

