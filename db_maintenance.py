"""Database maintenance behind the admin commands: schema versions (``init-db``,
``migrate``) and the check of stored records (``db-check``).

Schema versions: Alembic (through Flask-Migrate) keeps the database at models.py's schema.
The revisions live in ``migrations/versions``. ``prepare()`` is what ``init-db`` and
``migrate`` run: a new database gets the whole schema and is stamped at the newest revision;
a versioned one is upgraded in place, keeping its rows. When models.py changes, its author
adds a revision with ``flask --app app db revision --autogenerate -m "what changed"``.

Record check: ``check_records`` validates every record of a collection against the schema
its API accepts (or the stored-document shape of API.md section 4).
"""
import logging

import flask_migrate
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from errors import ApiError
from models import (ClinicalCase, Group, MyList, PluginDefinition, Project, Series, ServerParam,
                    User, db)
from plugins import definitions
from validation import validate

log = logging.getLogger(__name__)


# --- schema versions (init-db, migrate) ---------------------------------------------------

VERSION_TABLE = "alembic_version"


class UnversionedSchemaError(Exception):
    """Raised when a database has tables but no schema version, and they differ from models.py."""


def current_revision():
    """The revision the database is stamped with, or None."""
    with db.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_differences():
    """Alembic's list of differences between the database and models.py (empty: in step)."""
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, db.metadata)


def prepare():
    """Bring the database to the newest revision without losing rows.

    Returns
    -------
    str
        What was done: ``"created"`` (new database), ``"upgraded from <rev>"``, ``"current"``
        (nothing to do) or ``"stamped"`` (tables made before migrations existed, in step
        with models.py).

    Raises
    ------
    UnversionedSchemaError
        The database has tables, no version, and a schema that differs from models.py.
    """
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)  # its INFO lines repeat on every connection
    try:
        return _prepare()
    finally:
        alembic_log.setLevel(level)


def _prepare():
    tables = set(sa.inspect(db.engine).get_table_names())
    if VERSION_TABLE in tables:
        before = current_revision()
        flask_migrate.upgrade()
        after = current_revision()
        if before == after:
            return "current"
        log.info("Schema upgraded from revision %s to %s.", before, after)
        return f"upgraded from {before}"
    if not tables & set(db.metadata.tables):
        db.create_all()
        flask_migrate.stamp()
        return "created"
    differences = schema_differences()
    if differences:
        raise UnversionedSchemaError(
            "The database has tables but no schema version, and they differ from models.py: "
            "stamp the revision they match with `flask --app app db stamp REVISION`, then run "
            f"`flask --app app migrate`. Differences: {differences}")
    flask_migrate.stamp()
    return "stamped"


# --- the check of stored records (db-check) -----------------------------------------------

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
