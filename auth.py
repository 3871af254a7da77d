"""Who is calling and what they may do.

Tokens are 40 lowercase hex characters from ``secrets``; only their SHA-256 digests are
stored. The fail-closed ``before_request`` hook authenticates every request except the
endpoints in PUBLIC_ENDPOINTS, then computes the caller's privileges once into ``g``.
Every "may this user do X" decision of the project is made by the helpers below.
"""
import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import bcrypt
from flask import current_app, g, has_request_context, request
from werkzeug.security import check_password_hash, generate_password_hash

import table_versions
from errors import ApiError
from models import (GROUPS_STAMP, Group, SystemState, Token, User, db, iso, parse_iso,
                    random_hex, utcnow)

log = logging.getLogger(__name__)

PERMANENT_EXPIRY = datetime(2100, 12, 31)
MAX_TOKEN_LIFETIME = 100 * 365 * 86400  # seconds; beyond it expiresIn overflows dates
# Token scopes (None on a token: all of them). "admin" covers everything, "write"
# everything but /api/admin, "read" GET/HEAD of /api, /rs and /dicom-web (not /api/admin),
# "upload" only series uploads and STOW-RS. They narrow the owner's rights, never add.
SCOPES = ("read", "upload", "write", "admin")
UPLOAD_ENDPOINTS = {"series.upload_series", "series.upload_single"}
STOW_PATH = re.compile(r"^/dicom-web/studies(/[^/]+)?/?$")  # STOW-RS (routes/dicomweb.py)
READ_PREFIXES = ("/api", "/rs", "/dicom-web")
LAST_USED_INTERVAL = timedelta(seconds=60)  # lastUsedAt is written at most this often
CLIENT_ID = "CIRCUS Front UI"

GLOBAL_PRIVILEGES = [
    ("createProject", "Create Project"),
    ("deleteProject", "Delete Project"),
    ("manageServer", "Manage Server"),
    ("personalInfoView", "View Personal Info"),
    ("downloadVolume", "Download Volume as Raw File"),
    ("issueOnetime", "Issue Onetime URL"),
]
# project role -> group attribute, in CIRCUS's fixed order
PROJECT_ROLES = {"read": "read_projects", "write": "write_projects",
                 "viewPersonalInfo": "view_personal_info_projects",
                 "moderate": "moderate_projects", "addSeries": "add_series_projects"}
# plug-in role -> group attribute, in CIRCUS's fixed order
PLUGIN_ROLES = {"readPlugin": "read_plugin", "executePlugin": "execute_plugin",
                "manageJobs": "manage_jobs", "inputPersonalFeedback": "input_personal_feedback",
                "inputConsensualFeedback": "input_consensual_feedback",
                "manageFeedback": "manage_feedback", "viewPersonalInfo": "view_personal_info"}

# /api/admin needs manageServer, except the child blueprints named here (API.md 3.17).
ADMIN_PRIVILEGE = "manageServer"
ADMIN_EXCEPTIONS = {"admin.admin_onetime_urls": "issueOnetime"}

# Endpoints reachable without a token (OPTIONS is answered before routing).
PUBLIC_ENDPOINTS = {"status.get_status", "login.post_login", "plugin_displays.get_display",
                    "web_ui.get_web_ui",
                    # the image server: its views call check_series_token themselves
                    # (token by header or ?token=; metadata may go without one, as CIRCUS)
                    "rs.get_metadata", "rs.get_volume", "rs.get_scan", "rs.volume_socket"}


# --- secrets ----------------------------------------------------------------------------

def digest(secret):
    """SHA-256 hex digest of a token or one-time string: the only form ever stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def hash_password(password):
    """Hash a password with werkzeug (scrypt; tests may configure a cheaper method)."""
    return generate_password_hash(password, method=current_app.config.get(
        "PASSWORD_HASH_METHOD", "scrypt"))


def check_password(stored_hash, password):
    """Verify a password against a werkzeug hash or a bcrypt hash migrated from CIRCUS."""
    if not stored_hash:
        return False
    if stored_hash.startswith(("$2y$", "$2b$", "$2a$")):
        normalized = "$2b$" + stored_hash[4:]
        try:
            return bcrypt.checkpw(password.encode("utf-8"), normalized.encode("ascii"))
        except ValueError:
            return False
    try:
        return check_password_hash(stored_hash, password)
    except ValueError:
        return False


def issue_login_token(user_email):
    """Create a session token pair; return (access_token, refresh_token, lifetime seconds)."""
    access, refresh = random_hex(), random_hex()
    now = utcnow()
    lifetime = current_app.config["ACCESS_TOKEN_LIFETIME"]
    db.session.add(Token(
        access_token_hash=digest(access), refresh_token_hash=digest(refresh),
        access_token_expires_at=now + timedelta(seconds=lifetime),
        refresh_token_expires_at=now + timedelta(seconds=current_app.config["REFRESH_TOKEN_LIFETIME"]),
        client_id=CLIENT_ID, user_email=user_email))
    return access, refresh, lifetime


def issue_permanent_token(user_email, description, scopes=None, expires_at=None):
    """Create a permanent token; return (token_id, access_token). The caller commits.

    ``scopes`` (None: every right of the owner) narrow it; ``expires_at`` (None: never,
    i.e. CIRCUS's 2100-12-31) ends it. Both are checked by ``check_token_request``.
    """
    access, token_id = random_hex(), random_hex()
    expiry = expires_at or PERMANENT_EXPIRY
    db.session.add(Token(
        access_token_hash=digest(access), refresh_token_hash=digest(random_hex()),
        access_token_expires_at=expiry, refresh_token_expires_at=expiry,
        client_id=CLIENT_ID, user_email=user_email, permanent_token_id=token_id,
        permanent_token_description=description,
        scopes=None if scopes is None else sorted(set(scopes), key=SCOPES.index)))
    return token_id, access


def token_expiry_json(expires_at):
    """``expiresAt`` on the wire: null for a token that never expires."""
    return None if expires_at is None or expires_at >= PERMANENT_EXPIRY else iso(expires_at)


def check_token_request(scopes=None, expires_in=None, expires_at=None):
    """The (scopes, expiry datetime) of a new token, or ApiError 400/403.

    Scopes must exist; the expiry must lie in the future. A scoped caller's token can only
    make tokens within its own scopes: scopes narrow a token, they never add to it.
    """
    if scopes is not None:
        unknown = [scope for scope in scopes if scope not in SCOPES]
        if unknown or not scopes:
            raise ApiError(400, f"Unknown token scope: {', '.join(map(str, unknown))}. "
                           f"Scopes are {', '.join(SCOPES)}." if unknown
                           else "scopes must name at least one scope.")
    if expires_in is not None and expires_at is not None:
        raise ApiError(400, "Give either expiresIn or expiresAt, not both.")
    expiry = None
    if expires_in is not None:
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
            raise ApiError(400, "expiresIn must be a positive number of seconds.")
        if expires_in > MAX_TOKEN_LIFETIME:
            raise ApiError(400, "expiresIn is too large.")
        expiry = utcnow() + timedelta(seconds=expires_in)
    elif expires_at is not None:
        try:
            expiry = parse_iso(expires_at)
        except (TypeError, ValueError):
            raise ApiError(400, "expiresAt must be an ISO-8601 date and time.") from None
        if expiry <= utcnow():
            raise ApiError(400, "expiresAt must lie in the future.")
        expiry = min(expiry, PERMANENT_EXPIRY)
    caller = g.get("token_scopes") if has_request_context() else None
    if caller is not None and not all(
            _covers(caller, want) for want in (scopes if scopes is not None else SCOPES)):
        raise ApiError(403, "A token cannot create a token with scopes beyond its own.")
    return scopes, expiry


def find_user(email_or_login_id):
    """The user whose e-mail or login ID is given, or None."""
    return db.session.execute(
        db.select(User).where(db.or_(User.user_email == email_or_login_id,
                                     User.login_id == email_or_login_id))
        .order_by(User.created_at).limit(1)).scalar_one_or_none()


# --- privileges -------------------------------------------------------------------------

# The queries of authentication, built once: building a statement costs more than running
# it on an indexed column. With the caller come the state stamps: groupsStamp (privileges,
# below) and the searched tables' versions (table_versions: a list request then needs no
# query of its own for them). Groups come back as plain rows, not entities.
_STAMP_KEYS = (GROUPS_STAMP, *table_versions.KEYS)
_STAMPS = [db.select(SystemState.value).where(SystemState.key == key).scalar_subquery()
           for key in _STAMP_KEYS]
_TOKEN_OWNER = (db.select(Token.access_token_expires_at, Token.id, Token.permanent_token_id,
                          Token.scopes, Token.last_used_at, User, *_STAMPS)
                .join(User, User.user_email == Token.user_email)
                .where(Token.access_token_hash == db.bindparam("digest")))
_USER_BY_EMAIL = (db.select(User, *_STAMPS)
                  .where(User.user_email == db.bindparam("email")))
_CACHE_SIZE = 1024  # privileges kept per app, one per (groupsStamp, group-ID list)
_GROUPS_BY_ID = db.select(
    Group.group_id, Group.group_name, Group.privileges, Group.domains,
    *(getattr(Group, attr) for attr in (*PROJECT_ROLES.values(), *PLUGIN_ROLES.values()))
).where(Group.group_id.in_(db.bindparam("ids", expanding=True)))


@dataclass
class Privileges:
    """A user's effective privileges: the union over their groups, in first-seen order."""
    domains: list = field(default_factory=list)
    global_privileges: list = field(default_factory=list)
    project_roles: dict = field(default_factory=dict)  # projectId -> [roles]
    plugin_roles: dict = field(default_factory=dict)  # pluginId -> [roles]
    group_ids: list = field(default_factory=list)
    group_names: list = field(default_factory=list)

    def has_global(self, privilege):
        return privilege in self.global_privileges

    def has_domain(self, domain):
        return domain in self.domains

    def has_project_role(self, project_id, role):
        return role in self.project_roles.get(project_id, ())

    def has_plugin_role(self, plugin_id, role):
        return role in self.plugin_roles.get(plugin_id, ())

    def projects_with(self, *roles):
        """IDs of the projects on which the user holds every given role."""
        return [pid for pid, have in self.project_roles.items() if all(r in have for r in roles)]

    def plugins_with(self, *roles):
        """IDs of the plug-ins on which the user holds every given role."""
        return [pid for pid, have in self.plugin_roles.items() if all(r in have for r in roles)]


def _append(items, value):
    if value not in items:
        items.append(value)


def compute_privileges(user):
    """Compute a user's privileges from their groups (one query; dangling IDs are skipped)."""
    privileges = Privileges()
    group_ids = [gid for gid in (user.groups or []) if isinstance(gid, int)]
    if not group_ids:
        return privileges
    rows = {grp.group_id: grp for grp in db.session.execute(_GROUPS_BY_ID, {"ids": group_ids})}
    for gid in group_ids:
        grp = rows.get(gid)
        if grp is None:
            continue
        privileges.group_ids.append(gid)
        privileges.group_names.append(grp.group_name)
        for priv in grp.privileges or []:
            _append(privileges.global_privileges, priv)
        for domain in grp.domains or []:
            _append(privileges.domains, domain)
        for role, attr in PROJECT_ROLES.items():
            for pid in getattr(grp, attr) or []:
                privileges.project_roles.setdefault(pid, [])
        for role, attr in PLUGIN_ROLES.items():
            for pid in getattr(grp, attr) or []:
                privileges.plugin_roles.setdefault(pid, [])
    # Roles are appended in CIRCUS's fixed role order, whatever the group order.
    for role, attr in PROJECT_ROLES.items():
        for gid in privileges.group_ids:
            for pid in getattr(rows[gid], attr) or []:
                _append(privileges.project_roles[pid], role)
    for role, attr in PLUGIN_ROLES.items():
        for gid in privileges.group_ids:
            for pid in getattr(rows[gid], attr) or []:
                _append(privileges.plugin_roles[pid], role)
    return privileges


def cached_privileges(user, stamp):
    """``compute_privileges(user)``, reused while the groups are unchanged.

    ``stamp`` is the ``groupsStamp`` read in the same query as the user: every change to a
    group writes a new one in its own transaction (models.py), so an entry is only ever
    reused for the very group rows it was computed from, on every host. Without a stamp
    (a database whose groups were never written through the ORM) nothing is cached.
    The returned object is shared between requests: treat it as read-only.
    """
    if stamp is None:
        return compute_privileges(user)
    return table_versions.app_memo("circus.privileges", _CACHE_SIZE).get(
        (stamp, tuple(user.groups or ())), lambda: compute_privileges(user))


# --- the request hook -------------------------------------------------------------------

def _bearer_token():
    """The bearer token of the request, or an ApiError as CIRCUS answers it."""
    if "access_token" in request.args:
        raise ApiError(400, "Invalid request: do not send bearer tokens in query URLs")
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(401, "Unauthorized request: no authentication given")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(400, "Invalid request: malformed authorization header")
    return token.strip()


def authenticate_token(token):
    """(user, state stamps) of a valid, unexpired token, else ApiError 401: one query.

    The token's public ID (for the audit trail) and scopes go into ``g``.
    """
    row = db.session.execute(_TOKEN_OWNER, {"digest": digest(token)}).first()
    if row is None:
        raise ApiError(401, "Invalid token: access token is invalid")
    expires_at, row_id, public_id, scopes, last_used, user, *stamps = row
    now = utcnow()
    if expires_at < now:
        raise ApiError(401, "Invalid token: access token has expired")
    if public_id is not None and (last_used is None or last_used < now - LAST_USED_INTERVAL):
        _touch(row_id, now)
    g.token_id = public_id or f"session-{row_id}"  # never the token's value
    g.token_scopes = scopes
    return user, dict(zip(_STAMP_KEYS, stamps))


def _touch(row_id, now):
    """Write a token's lastUsedAt, at most once a minute (a short transaction of its own:
    the request's may be read-only; the condition keeps concurrent requests from writing it
    twice)."""
    try:
        with db.engine.begin() as connection:
            connection.execute(db.update(Token).where(
                Token.id == row_id, db.or_(Token.last_used_at.is_(None),
                                           Token.last_used_at < now - LAST_USED_INTERVAL))
                .values(last_used_at=now))
    except Exception:  # a busy database must not refuse the request for a statistic
        log.warning("lastUsedAt of token %s not written", row_id, exc_info=True)


def _covers(scopes, scope):
    """Whether a token holding ``scopes`` may hold ``scope``."""
    return (scope in scopes or "admin" in scopes
            or ("write" in scopes and scope in ("read", "upload")))


def _is_admin_path(path):
    return path == "/api/admin" or path.startswith("/api/admin/")


def scope_allows(scopes, method, path, endpoint):
    """Whether a token of ``scopes`` (None: unscoped) may make this request."""
    if scopes is None or "admin" in scopes:
        return True
    admin = _is_admin_path(path) or (endpoint or "").startswith("admin.")
    if "write" in scopes and not admin:
        return True
    if ("read" in scopes and method in ("GET", "HEAD") and not admin
            and any(path == p or path.startswith(p + "/") for p in READ_PREFIXES)):
        return True
    return "upload" in scopes and method == "POST" and (
        endpoint in UPLOAD_ENDPOINTS or STOW_PATH.match(path) is not None)


def require_token_scope():
    """ApiError 403 unless the request's token scopes allow it (a no-op for unscoped tokens)."""
    scopes = g.get("token_scopes")
    if not scope_allows(scopes, request.method, request.path, request.endpoint):
        raise ApiError(403, f"This token's scopes ({', '.join(scopes)}) do not allow "
                       f"{request.method} {request.path}.")


def authenticate_request():
    """before_request hook: fail closed unless the endpoint is public."""
    g.user = None
    g.privileges = Privileges()
    g.token_id = g.token_scopes = None
    if request.method == "OPTIONS" or request.endpoint is None:
        return  # CORS preflight, or an unknown route that will answer 404
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    fixed = current_app.config.get("FIX_USER")
    if fixed:
        row = db.session.execute(_USER_BY_EMAIL, {"email": fixed}).first()
        if row is None:
            raise ApiError(401, "Invalid token: access token is invalid")
        user, stamps = row[0], dict(zip(_STAMP_KEYS, row[1:]))
    else:
        user, stamps = authenticate_token(_bearer_token())
        require_token_scope()
    g.user = user
    table_versions.remember(stamps)
    g.privileges = cached_privileges(user, stamps[GROUPS_STAMP])


def rs_request_token():
    """The token of an image server request: the bearer header, else ``?token=``, else None."""
    if request.headers.get("Authorization"):
        return _bearer_token()
    return request.args.get("token") or None


def check_series_token(token, domain):
    """The owner of a valid token whose groups hold ``domain`` (the image server's check,
    made outside the hook); ApiError 401 for the token, 403 for the domain."""
    user, stamps = authenticate_token(token)
    require_token_scope()
    if not cached_privileges(user, stamps[GROUPS_STAMP]).has_domain(domain):
        raise ApiError(403, "You do not have privilege to access this series.")
    return user


# --- checks used by views ---------------------------------------------------------------
# --- decisions: who may do what, and the words of each refusal ------------------------
# Nothing else in the project decides. Domain functions that take a caller's privileges as
# an argument (the CLI passes computed ones) hand them on; views leave ``privileges`` out
# and the request's own are used. Domain modules ask the ``*_ids``/``*_domains`` helpers
# what the caller may see and build their queries from the answer.

SERIES_REFUSAL = "You do not have privilege to access this series."


def _of(privileges):
    return g.privileges if privileges is None else privileges


# global privileges

def require_global(*privileges):
    """ApiError 401 unless the caller holds every given global privilege."""
    missing = [p for p in privileges if not g.privileges.has_global(p)]
    if missing:
        raise ApiError(401, "You do not have sufficient privilege to access this resource."
                       + ",".join(missing))


def require_admin():
    """before_request of the /api/admin parent blueprint: the one guard of every admin route."""
    require_global(ADMIN_EXCEPTIONS.get(request.blueprint, ADMIN_PRIVILEGE))


def can_view_personal_info():
    """Global personalInfoView and the caller's own preference both allow patient info."""
    return (g.privileges.has_global("personalInfoView")
            and bool((g.user.preferences or {}).get("personalInfoView")))


def require_personal_info_view():
    """ApiError 403 unless the caller holds personalInfoView: whole DICOM files (DICOMweb
    retrieve) carry the patient's data, which no preference can strip from them."""
    if not g.privileges.has_global("personalInfoView"):
        raise ApiError(403, "You do not have privilege to retrieve whole DICOM files.")


def can_search_patient_info():
    """Whether a search filter may name patientInfo.* keys (global personalInfoView)."""
    return g.privileges.has_global("personalInfoView")


# projects and cases

def project_role_refusal(role):
    """The 401 of a missing project role (also for a project a group names but that is gone)."""
    return ApiError(401, f'You do not have "{role}" privilege of this project.')


def require_project_role(project_id, *roles, privileges=None):
    """ApiError 401 unless the caller holds every given role on the project."""
    for role in roles:
        if not _of(privileges).has_project_role(project_id, role):
            raise project_role_refusal(role)


def require_case_role(case, *roles, privileges=None):
    """ApiError 401 unless the caller holds every given role on the case's project (2.4)."""
    require_project_role(case.project_id, *roles, privileges=privileges)


def require_cases_writable(project_ids, privileges=None):
    """ApiError 401 unless the caller may write every project of a bulk tag change."""
    if not all(_of(privileges).has_project_role(pid, "write") for pid in project_ids):
        raise ApiError(401, "You do not have write access to some of the specified cases.")


def require_cases_readable(project_ids, privileges=None):
    """ApiError 401 unless the caller may read every project of an export's cases."""
    if not all(_of(privileges).has_project_role(pid, "read") for pid in project_ids):
        raise ApiError(401, "You do not have enough read privilege for some cases.")


def readable_project_ids(privileges=None):
    """IDs of the projects whose cases the caller may read."""
    return _of(privileges).projects_with("read")


def personal_info_project_ids(privileges=None):
    """IDs of the projects whose cases show the caller patient information (2.6)."""
    return _of(privileges).projects_with("read", "viewPersonalInfo")


# domains and series

def readable_domains(privileges=None):
    """The domains whose series the caller may see."""
    return _of(privileges).domains


def require_series_domain(series, privileges=None):
    """ApiError 403 unless the series' domain is one of the caller's domains."""
    if not _of(privileges).has_domain(series.domain):
        raise ApiError(403, SERIES_REFUSAL)


def require_upload_domain(domain):
    """ApiError 403 unless the caller may upload series into the domain."""
    if not g.privileges.has_domain(domain):
        raise ApiError(403, "You cannot upload to this domain.")


def require_job_series_domain(series, privileges=None):
    """ApiError 400 (as CIRCUS) unless a new job's series is in one of the caller's domains."""
    if not _of(privileges).has_domain(series.domain):
        raise ApiError(400, "You cannot access this series.")


def require_job_domains(domains):
    """ApiError 401 unless every domain of a plug-in job's series is the caller's (2.4 step 4)."""
    if not all(g.privileges.has_domain(domain) for domain in domains):
        raise ApiError(401, "You do not have privilege to access this plugin-job.")


# plug-ins and their jobs

def require_plugin_role(plugin_id, *roles, privileges=None):
    """ApiError 401 unless the caller holds every given role on the plug-in."""
    for role in roles:
        if not _of(privileges).has_plugin_role(plugin_id, role):
            raise ApiError(401, f'You do not have "{role}" privilege of this plugin.')


def require_plugin_readable(plugin_id):
    """ApiError 401 unless the caller holds readPlugin (GET /api/plugins/:id's words)."""
    if not g.privileges.has_plugin_role(plugin_id, "readPlugin"):
        raise ApiError(401, "You do not have permission to get this plugin.")


def require_plugin_execution(plugin_id, privileges=None):
    """ApiError 401 unless the caller holds readPlugin and executePlugin (one message)."""
    if not all(_of(privileges).has_plugin_role(plugin_id, role)
               for role in ("readPlugin", "executePlugin")):
        raise ApiError(401, 'You do not have "executePlugin" privilege of this plugin.')


def require_job_invalidation(job):
    """ApiError 401 unless the caller holds manageJobs on the job's plug-in."""
    if not g.privileges.has_plugin_role(job.plugin_id, "manageJobs"):
        raise ApiError(401, "You do not have permission to invalidate this job.")


def readable_plugin_ids(privileges=None):
    """IDs of the plug-ins (and so jobs) the caller may read."""
    return _of(privileges).plugins_with("readPlugin")


def personal_info_plugin_ids(privileges=None):
    """IDs of the plug-ins whose jobs show the caller patient information (2.6)."""
    return _of(privileges).plugins_with("readPlugin", "viewPersonalInfo")


# my lists and tasks: the owner's, or shared by the list itself

def can_read_my_list(my_list, user=None):
    """Whether the user may read a list's items: the owner, or anyone for a public list."""
    user = user or g.user
    return my_list.user_email == user.user_email or bool(my_list.public)


def can_edit_my_list(my_list, user=None):
    """Whether the user may edit a list's items: the owner or an editor (user or group)."""
    user = user or g.user
    if my_list.user_email == user.user_email:
        return True
    groups = set(user.groups or [])
    for editor in my_list.editors or []:
        if editor.get("type") == "user" and editor.get("userEmail") == user.user_email:
            return True
        if editor.get("type") == "group" and editor.get("groupId") in groups:
            return True
    return False


def require_my_list_readable(my_list, user=None):
    """ApiError 401 unless the user may read the list's items."""
    if not can_read_my_list(my_list, user):
        raise ApiError(401, "You cannot read the items of this my list.")


def require_my_list_editable(my_list):
    """ApiError 401 unless the caller may edit the list's items."""
    if not can_edit_my_list(my_list):
        raise ApiError(401, "You cannot edit the items of this my list.")


def require_my_list_owner(my_list, action, user_email=None):
    """ApiError 401 unless the caller owns the list (``action``: "edit" or "delete")."""
    if my_list.user_email != (user_email or g.user.user_email):
        raise ApiError(401, f"You cannot {action} a my list you do not own")


def owns_task(task):
    """Whether the task is the caller's."""
    return task.user_email == g.user.user_email


def require_task_owner(task):
    """ApiError 401 unless the task is the caller's."""
    if not owns_task(task):
        raise ApiError(401, "You cannot access this task.")
