"""Administration of groups, users, projects and server parameters (API.md 3.16), and the
check of stored records behind ``flask db-check``.

Request bodies arrive validated against their schemas (schemas/group.yaml, user.yaml,
project.yaml, ...); the rules here are the ones a schema cannot express. Every change is one
transaction.
"""
import logging

from sqlalchemy.exc import IntegrityError

import accounts
from auth import hash_password
from errors import ApiError, not_found
from models import (GROUP_ARRAY_FIELDS, ClinicalCase, Group, MyList, PluginDefinition, Project,
                    Series, ServerParam, User, db, new_ulid, get_or_404, put_value)
from plugins import definitions
from validation import validate

log = logging.getLogger(__name__)

PRIMARY_KEY_MODIFIED = "The primary key cannot be modified."
VANISHED = "The request resource was not found."

# Sortable keys of the admin lists (their filters are ignored, as in CIRCUS).
GROUP_SORT = {"groupId": Group.group_id, "groupName": Group.group_name,
              "createdAt": Group.created_at, "updatedAt": Group.updated_at}
USER_SORT = {"userEmail": User.user_email, "loginId": User.login_id,
             "description": User.description, "loginEnabled": User.login_enabled,
             "lastLoginTime": User.last_login_time, "lastLoginIp": User.last_login_ip,
             "createdAt": User.created_at, "updatedAt": User.updated_at}
PROJECT_SORT = {"projectId": Project.project_id, "projectName": Project.project_name,
                "description": Project.description, "windowPriority": Project.window_priority,
                "createdAt": Project.created_at, "updatedAt": Project.updated_at}


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


# --- db-check ---------------------------------------------------------------------------

class InvalidRecord(Exception):
    """Raised by ``check_records`` at the first stored record that fails its schema."""

    def __init__(self, target, key, errors):
        super().__init__(f"{target} {key!r} is invalid")
        self.target = target
        self.key = key
        self.errors = errors


def _without_dates(doc):
    return {k: v for k, v in doc.items() if k not in ("createdAt", "updatedAt")}


def _stored_user(user):
    return {**_without_dates(user.to_json()), "password": user.password}


def _stored_case(case):
    return {"caseId": case.case_id, "projectId": case.project_id, "tags": case.tags,
            "latestRevision": case.latest_revision, "domains": case.domains}


UID = {"type": "string", "maxLength": 64, "pattern": r"^[0-9]+(\.[0-9]+)+$"}
_RANGE = r"(0|[1-9][0-9]*)(-(0|[1-9][0-9]*))?"
PATIENT_INFO = {
    "type": "object", "additionalProperties": False,
    "properties": {"patientId": {"type": "string"}, "patientName": {"type": "string"},
                   "age": {"type": "number"}, "birthDate": {"type": "string"},
                   "sex": {"enum": ["F", "M", "O"]}, "size": {"type": "number"},
                   "weight": {"type": "number"}}}
STORED_SERIES = {  # API.md 4.3
    "type": "object", "additionalProperties": False,
    "required": ["seriesUid", "studyUid", "width", "height", "images", "seriesDate", "modality",
                 "seriesDescription", "bodyPart", "stationName", "modelName", "manufacturer",
                 "storageId", "patientInfo", "parameters", "domain"],
    "properties": {
        "seriesUid": UID, "studyUid": UID, "width": {"type": "number"},
        "height": {"type": "number"},
        "images": {"type": "string", "pattern": f"^{_RANGE}(,{_RANGE})*$"},
        "seriesDate": {"type": ["string", "null"]},
        "modality": {"type": "string", "maxLength": 10},
        "seriesDescription": {"type": "string"}, "bodyPart": {"type": "string"},
        "stationName": {"type": "string"}, "modelName": {"type": "string"},
        "manufacturer": {"type": "string"}, "storageId": {"type": "number"},
        "patientInfo": PATIENT_INFO, "parameters": {"type": "object"},
        "domain": {"type": "string"}}}
REVISION = {  # API.md 4.5; labels are checked by the cases module when written
    "type": "object", "required": ["creator", "date", "description", "attributes", "status",
                                   "series"],
    "properties": {
        "creator": {"type": "string"}, "description": {"type": "string"},
        "attributes": {"type": "object"}, "status": {"type": "string"},
        "series": {"type": "array", "items": {
            "type": "object", "required": ["seriesUid", "labels"],
            "properties": {"seriesUid": UID, "labels": {"type": "array", "items": {
                "type": "object", "required": ["type", "data"]}}}}}}}
STORED_CASE = {  # API.md 4.4
    "type": "object", "additionalProperties": False,
    "required": ["caseId", "projectId", "tags", "latestRevision", "domains"],
    "properties": {"caseId": {"type": "string"}, "projectId": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}},
                   "latestRevision": REVISION,
                   "domains": {"type": "array", "items": {"type": "string"}}}}
MY_LIST_EDITOR = {"oneOf": [
    {"type": "object", "additionalProperties": False, "required": ["type", "userEmail"],
     "properties": {"type": {"const": "user"}, "userEmail": {"type": "string"}}},
    {"type": "object", "additionalProperties": False, "required": ["type", "groupId"],
     "properties": {"type": {"const": "group"}, "groupId": {"type": "integer"}}}]}
STORED_MY_LIST = {  # the header of API.md 4.9
    "type": "object", "additionalProperties": False,
    "required": ["myListId", "resourceType", "name", "public", "editors", "createdAt"],
    "properties": {"myListId": {"type": "string"},
                   "resourceType": {"enum": ["series", "clinicalCases", "pluginJobs"]},
                   "name": {"type": "string", "minLength": 1, "maxLength": 64},
                   "public": {"type": "boolean"},
                   "editors": {"type": "array", "items": MY_LIST_EDITOR},
                   "createdAt": {"type": "string"}}}

# target -> (model, key column, stored document, schema or validating function);
# CIRCUS's collection names.
RECORD_CHECKS = {
    "groups": (Group, Group.group_id, lambda g: _without_dates(g.to_json()),
               {"allOf": [{"$ref": "group-create.yaml"}, {"required": ["groupId"]}]}),
    "users": (User, User.user_email, _stored_user,
              {"allOf": [{"$ref": "user-create.yaml"},
                         {"required": ["lastLoginTime", "lastLoginIp", "preferences"]}]}),
    "projects": (Project, Project.project_id, lambda p: _without_dates(p.to_json()),
                 {"allOf": [{"$ref": "project-create.yaml"}, {"required": ["projectId"]}]}),
    "serverParams": (ServerParam, ServerParam.key, lambda p: {p.key: p.value},
                     "server-params"),
    "series": (Series, Series.series_uid, lambda s: _without_dates(s.to_json()),
               STORED_SERIES),
    "clinicalCases": (ClinicalCase, ClinicalCase.case_id, _stored_case, STORED_CASE),
    "myLists": (MyList, MyList.my_list_id, lambda m: m.to_json(), STORED_MY_LIST),
    "pluginDefinitions": (PluginDefinition, PluginDefinition.plugin_id,
                          definitions.document, definitions.validate_definition),
}
CHECK_BATCH = 500


def check_records(targets=None, progress=None):
    """Validate every stored record of each target; return {target: count}.

    Parameters
    ----------
    targets : list of str, optional
        Keys of RECORD_CHECKS to check (default: all, in that order).
    progress : callable, optional
        Called with (target, None) before and (target, count) after each target.

    Raises
    ------
    InvalidRecord
        At the first record that does not match its schema.
    KeyError
        For an unknown target.
    """
    counts = {}
    for target in targets or list(RECORD_CHECKS):
        model, key, to_doc, schema = RECORD_CHECKS[target]
        if progress:
            progress(target, None)
        count = 0
        rows = db.session.execute(db.select(model).order_by(key)
                                  .execution_options(yield_per=CHECK_BATCH)).scalars()
        check = schema if callable(schema) else (lambda doc, schema=schema: validate(doc, schema))
        for row in rows:
            try:
                check(to_doc(row))
            except ApiError as error:
                errors = error.extra.get("validationErrors") or [
                    {"dataPath": "", "message": error.message}]
                raise InvalidRecord(target, getattr(row, key.key), errors) from None
            count += 1
        counts[target] = count
        if progress:
            progress(target, count)
    return counts
