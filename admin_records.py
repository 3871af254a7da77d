"""Administration of groups, users, projects and server parameters (API.md 3.16).

Request bodies arrive validated against their schemas (schemas/group.yaml, user.yaml,
project.yaml, ...); the rules here are the ones a schema cannot express. Every change is one
transaction.
"""
import logging

from sqlalchemy.exc import IntegrityError

import accounts
from auth import hash_password
from errors import ApiError, get_or_404, not_found
from models import GROUP_ARRAY_FIELDS, Group, Project, ServerParam, User, db, new_ulid, put_value
from search import SearchSpec
from validation import validate

log = logging.getLogger(__name__)

PRIMARY_KEY_MODIFIED = "The primary key cannot be modified."
VANISHED = "The request resource was not found."

# The admin lists: sortable keys only, their filters are ignored (as in CIRCUS).
GROUP_SEARCH = SearchSpec(
    fields={}, filter_allowed=False, unlimited_allowed=True, serialize=Group.to_json,
    default_sort={"groupId": 1},
    sort_fields={"groupId": Group.group_id, "groupName": Group.group_name,
                 "createdAt": Group.created_at, "updatedAt": Group.updated_at})
USER_SEARCH = SearchSpec(  # passwords never returned: User.public_columns()
    fields={}, filter_allowed=False, serialize=User.to_json, default_sort={"createdAt": -1},
    sort_fields={"userEmail": User.user_email, "loginId": User.login_id,
                 "description": User.description, "loginEnabled": User.login_enabled,
                 "lastLoginTime": User.last_login_time, "lastLoginIp": User.last_login_ip,
                 "createdAt": User.created_at, "updatedAt": User.updated_at})
PROJECT_SEARCH = SearchSpec(
    fields={}, filter_allowed=False, unlimited_allowed=True, serialize=Project.to_json,
    default_sort={"updatedAt": -1},
    sort_fields={"projectId": Project.project_id, "projectName": Project.project_name,
                 "description": Project.description,
                 "windowPriority": Project.window_priority,
                 "createdAt": Project.created_at, "updatedAt": Project.updated_at})


# --- groups -----------------------------------------------------------------------------

# (left, right): every ID in the left array must also be in the right one (API.md 2.7).
GROUP_CONSISTENCY = [
    ("writeProjects", "readProjects"), ("viewPersonalInfoProjects", "readProjects"),
    ("moderateProjects", "readProjects"), ("addSeriesProjects", "readProjects"),
    ("executePlugin", "readPlugin"), ("manageJobs", "readPlugin"),
    ("inputPersonalFeedback", "readPlugin"), ("inputConsensualFeedback", "readPlugin"),
    ("manageFeedback", "readPlugin"), ("viewPersonalInfo", "readPlugin"),
]


def check_group_consistency(body):
    """ApiError 400 if a role is granted on an ID without its prerequisite role.

    Only the body counts (a missing array is empty), as in CIRCUS.
    """
    for left, right in GROUP_CONSISTENCY:
        allowed = body.get(right) or []
        inconsistent = [item for item in body.get(left) or [] if item not in allowed]
        if inconsistent:
            raise ApiError(400, f"All items with {left} must have {right}. "
                                f"Inconsistent IDs: {', '.join(map(str, inconsistent))}")


def _group_or_none(group_id):
    try:
        number = int(group_id)
    except (TypeError, ValueError):
        return None
    return db.session.get(Group, number)


def get_group(group_id):
    """The group whose ID (URL text) is given; 404 for unknown or non-numeric IDs."""
    group = _group_or_none(group_id)
    if group is None:
        raise not_found("group")
    return group


def find_group(reference):
    """The group with that ID (digits) or, failing that, the only group with that name."""
    if str(reference).isdigit():
        group = db.session.get(Group, int(reference))
        if group is not None:
            return group
    groups = db.session.execute(db.select(Group).where(Group.group_name == str(reference))
                                .limit(2)).scalars().all()
    return groups[0] if len(groups) == 1 else None


def _set_group_fields(group, body):
    if "groupName" in body:
        group.group_name = body["groupName"]
    for wire, attr in GROUP_ARRAY_FIELDS.items():
        if wire in body:
            setattr(group, attr, list(body[wire]))


def empty_group(name):
    """A complete group body granting nothing (for create-group)."""
    return {"groupName": name, **{wire: [] for wire in GROUP_ARRAY_FIELDS}}


def create_group(body):
    """Insert a group with the next sequential ID; return that ID.

    The consistency rules of PATCH apply here too (CIRCUS forgot them, quirk 24).
    """
    if "groupId" in body:
        raise ApiError(400, "Group ID cannot be specified")
    check_group_consistency(body)
    group = Group()
    _set_group_fields(group, body)
    db.session.add(group)
    db.session.commit()
    log.info("Group %s (%s) created", group.group_id, group.group_name)
    return group.group_id


def update_group(group_id, body):
    """Apply a partial group (already schema-valid) to the group."""
    check_group_consistency(body)
    if "groupId" in body:
        raise ApiError(400, PRIMARY_KEY_MODIFIED)
    group = _group_or_none(group_id)
    if group is None:
        raise ApiError(404, VANISHED)
    _set_group_fields(group, body)
    db.session.commit()


# --- users ------------------------------------------------------------------------------

class DuplicateUser(ApiError):
    """Raised when an e-mail address or login ID is already taken (CIRCUS: 500)."""

    def __init__(self, message):
        super().__init__(409, message)


def get_user(user_email):
    """The user with that e-mail, else 404 "The requested user was not found."."""
    return get_or_404(User, user_email, "user")


def _refuse_last_login(body):
    # CIRCUS answers a bare 400 ("Bad Request") when a client tries to forge these.
    if "lastLoginTime" in body or "lastLoginIp" in body:
        raise ApiError(400)


def _check_login_id_free(login_id, user_email):
    """DuplicateUser if the login ID belongs to, or is the e-mail of, another user."""
    other = db.session.execute(db.select(User.user_email).where(
        db.or_(User.login_id == login_id, User.user_email == login_id),
        User.user_email != user_email).limit(1)).first()
    if other is not None:
        raise DuplicateUser("The login ID is already used by another user.")


def _commit_user():
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise DuplicateUser("A user with this e-mail address or login ID already exists.") from None


def create_user(body):
    """Insert a user: password hashed, preferences over the defaults, never logged in.

    Returns the new user's e-mail.
    """
    _refuse_last_login(body)
    email = body["userEmail"]
    if db.session.get(User, email) is not None:
        raise DuplicateUser("A user with this e-mail address already exists.")
    _check_login_id_free(body["loginId"], email)
    db.session.add(User(
        user_email=email, login_id=body["loginId"], password=hash_password(body["password"]),
        description=body["description"], login_enabled=body["loginEnabled"],
        groups=list(body["groups"]),
        preferences={**accounts.default_preferences(), **body.get("preferences", {})}))
    _commit_user()
    log.info("User %s created", email)
    return email


def update_user(user_email, body):
    """Apply a partial user (already schema-valid); a new password is stored hashed."""
    _refuse_last_login(body)
    if "userEmail" in body:
        raise ApiError(400, PRIMARY_KEY_MODIFIED)
    user = db.session.get(User, user_email)
    if user is None:
        raise ApiError(404, VANISHED)
    if "loginId" in body and body["loginId"] != user.login_id:
        _check_login_id_free(body["loginId"], user_email)
        user.login_id = body["loginId"]
    if "password" in body:
        user.password = hash_password(body["password"])
    for wire, attr in (("description", "description"), ("loginEnabled", "login_enabled"),
                       ("groups", "groups"), ("preferences", "preferences")):
        if wire in body:
            setattr(user, attr, body[wire])
    _commit_user()
    log.info("User %s updated: %s", user_email, ", ".join(sorted(body)))


# --- projects ---------------------------------------------------------------------------

PROJECT_FIELDS = {
    "projectName": "project_name", "description": "description", "icon": "icon",
    "tags": "tags", "caseAttributesSchema": "case_attributes_schema",
    "labelAttributesSchema": "label_attributes_schema", "windowPresets": "window_presets",
    "windowPriority": "window_priority",
}


def get_project(project_id):
    """The project with that ID, else 404 "The requested project was not found."."""
    return get_or_404(Project, project_id, "project")


def create_project(body):
    """Insert a project under a new ULID; return the ID."""
    if "projectId" in body:
        raise ApiError(400, "Project ID cannot be specified")
    project = Project(project_id=new_ulid(),
                      **{attr: body[wire] for wire, attr in PROJECT_FIELDS.items()})
    db.session.add(project)
    db.session.commit()
    return project.project_id


def update_project(project_id, body):
    """Apply a partial project (already schema-valid)."""
    if "projectId" in body:
        raise ApiError(400, PRIMARY_KEY_MODIFIED)
    project = db.session.get(Project, project_id)
    if project is None:
        raise ApiError(404, VANISHED)
    for wire, attr in PROJECT_FIELDS.items():
        if wire in body:
            setattr(project, attr, body[wire])
    db.session.commit()


# --- server parameters ------------------------------------------------------------------

def all_server_params():
    """Every server parameter as one object {key: value}."""
    rows = db.session.execute(db.select(ServerParam).order_by(ServerParam.key)).scalars()
    return {row.key: row.value for row in rows}


def get_server_param(key):
    """The value of one parameter, else 404 "The requested serverParam was not found."."""
    row = db.session.get(ServerParam, key)
    if row is None:
        raise not_found("serverParam")
    return row.value


def put_server_params(values):
    """Upsert each key of ``values`` (checked against schemas/server-params.yaml)."""
    validate(values, "server-params")
    for key, value in values.items():
        put_value(ServerParam, key, value)
    db.session.commit()
