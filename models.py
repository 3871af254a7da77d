"""The database and every table; indexes are declared beside the columns they serve.

Documents keep CIRCUS's field names on the wire; ``to_json`` methods produce them.
Array fields that are searched (case tags, job series, my-list items) live in link
tables so that "any element matches" compiles to an indexed EXISTS on every database.
"""
import os
import secrets
import time
from datetime import datetime, timezone

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint, cast, event, type_coerce)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import UserDefinedType

from json_codec import stored_json


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_ulid():
    """A new lowercase ULID (48-bit millisecond time, 80 random bits, Crockford base32)."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def utcnow():
    """The current UTC time as a naive datetime (how every date column is stored)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(value):
    """Serialise a stored datetime as CIRCUS does: ISO-8601 UTC with milliseconds."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"  # naive: no offset; 3x strftime's speed


class IsoDateTime(UserDefinedType):
    """A DateTime column read straight into its ``iso`` string (``type_coerce`` a column to
    it in a select: the SQL is unchanged). SQLite stores SQLAlchemy's fixed format
    ``YYYY-MM-DD HH:MM:SS.ffffff``, which is cut into ``YYYY-MM-DDTHH:MM:SS.mmmZ`` without
    parsing it; any other stored value, and every database that returns datetimes, goes
    through DateTime's own reading and ``iso``: the same string either way."""
    cache_ok = True

    def result_processor(self, dialect, coltype):
        read = DateTime().dialect_impl(dialect).result_processor(dialect, coltype)

        def process(value):
            if value is None:
                return None
            if type(value) is str and len(value) == 26 and value[10] == " " and value[19] == ".":
                return value[:10] + "T" + value[11:23] + "Z"  # isoformat truncates too
            return iso(read(value) if read is not None else value)
        return process


def parse_iso(text):
    """Parse an ISO-8601 string into a naive UTC datetime; ValueError if malformed."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def put_value(model, key, value, session=None):
    """Insert or update one row of a key/value table (ServerParam, SystemState), in
    ``session`` (default: the app's)."""
    session = session or db.session
    row = session.get(model, key)
    if row is None:
        session.add(model(key=key, value=value))
    else:
        row.value = value


def upsert_statement(table, dialect_name=None):
    """``INSERT ... ON CONFLICT (primary key) DO UPDATE`` of every other column, in the
    dialect ``dialect_name`` (default: the app's database's; SQLite and PostgreSQL both
    say it; executemany-able)."""
    dialect_name = dialect_name or db.engine.dialect.name
    insert = (postgresql if dialect_name == "postgresql" else sqlite).insert(table)
    keys = [c.name for c in table.primary_key.columns]
    return insert.on_conflict_do_update(index_elements=keys, set_={
        c.name: insert.excluded[c.name] for c in table.columns if c.name not in keys})
def insert_ignore(connection, table, values):
    """INSERT ... ON CONFLICT DO NOTHING (SQLite and PostgreSQL): a row that concurrent
    requests may both create."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(table).values(**values).on_conflict_do_nothing())


def random_hex(nbytes=20):
    """A random lowercase hex string (40 characters by default, as CIRCUS tokens)."""
    return secrets.token_hex(nbytes)


class Timestamps:
    """createdAt / updatedAt, as every CIRCUS document has."""
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow,
                                                 index=True)

    def timestamps(self):
        return {"createdAt": iso(self.created_at), "updatedAt": iso(self.updated_at)}


# --- accounts -------------------------------------------------------------------------

class User(Timestamps, db.Model):
    __tablename__ = "users"
    user_email: Mapped[str] = mapped_column(String(254), primary_key=True)
    login_id: Mapped[str] = mapped_column(String(64), unique=True)
    password: Mapped[str] = mapped_column(String(255))  # werkzeug or bcrypt hash, never clear
    description: Mapped[str] = mapped_column(Text, default="")
    login_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_login_time: Mapped[datetime] = mapped_column(DateTime, default=lambda: datetime(1970, 1, 1))
    last_login_ip: Mapped[str] = mapped_column(String(64), default="")
    groups: Mapped[list] = mapped_column(JSON, default=list)  # group ids, in order
    preferences: Mapped[dict] = mapped_column(JSON, default=dict)

    def to_json(self):
        """The user document without the password (also works on a row of public_columns())."""
        return {"userEmail": self.user_email, "loginId": self.login_id,
                "description": self.description, "loginEnabled": self.login_enabled,
                "lastLoginTime": iso(self.last_login_time), "lastLoginIp": self.last_login_ip,
                "groups": self.groups or [], "preferences": self.preferences or {},
                "createdAt": iso(self.created_at), "updatedAt": iso(self.updated_at)}

    @classmethod
    def public_columns(cls):
        """Every column but the password: lists select these rows instead of whole objects."""
        return [column for column in cls.__table__.columns if column.key != "password"]


GROUP_ARRAY_FIELDS = {
    # wire name -> attribute name, in CIRCUS's order
    "privileges": "privileges", "domains": "domains",
    "readProjects": "read_projects", "writeProjects": "write_projects",
    "addSeriesProjects": "add_series_projects",
    "viewPersonalInfoProjects": "view_personal_info_projects",
    "moderateProjects": "moderate_projects",
    "readPlugin": "read_plugin", "executePlugin": "execute_plugin",
    "manageJobs": "manage_jobs", "inputPersonalFeedback": "input_personal_feedback",
    "inputConsensualFeedback": "input_consensual_feedback",
    "manageFeedback": "manage_feedback", "viewPersonalInfo": "view_personal_info",
}


class Group(Timestamps, db.Model):
    __tablename__ = "groups"
    group_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_name: Mapped[str] = mapped_column(String(128))
    privileges: Mapped[list] = mapped_column(JSON, default=list)
    domains: Mapped[list] = mapped_column(JSON, default=list)
    read_projects: Mapped[list] = mapped_column(JSON, default=list)
    write_projects: Mapped[list] = mapped_column(JSON, default=list)
    add_series_projects: Mapped[list] = mapped_column(JSON, default=list)
    view_personal_info_projects: Mapped[list] = mapped_column(JSON, default=list)
    moderate_projects: Mapped[list] = mapped_column(JSON, default=list)
    read_plugin: Mapped[list] = mapped_column(JSON, default=list)
    execute_plugin: Mapped[list] = mapped_column(JSON, default=list)
    manage_jobs: Mapped[list] = mapped_column(JSON, default=list)
    input_personal_feedback: Mapped[list] = mapped_column(JSON, default=list)
    input_consensual_feedback: Mapped[list] = mapped_column(JSON, default=list)
    manage_feedback: Mapped[list] = mapped_column(JSON, default=list)
    view_personal_info: Mapped[list] = mapped_column(JSON, default=list)

    def to_json(self):
        doc = {"groupId": self.group_id, "groupName": self.group_name}
        for wire, attr in GROUP_ARRAY_FIELDS.items():
            doc[wire] = list(getattr(self, attr) or [])
        doc.update(self.timestamps())
        return doc


class Token(Timestamps, db.Model):
    """A login session or permanent token. Only SHA-256 digests of the secrets are stored."""
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    access_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    access_token_expires_at: Mapped[datetime] = mapped_column(DateTime)
    refresh_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    refresh_token_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    client_id: Mapped[str] = mapped_column(String(64), default="CIRCUS Front UI")
    user_email: Mapped[str] = mapped_column(
        ForeignKey("users.user_email", ondelete="CASCADE", onupdate="CASCADE"), index=True)
    permanent_token_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    permanent_token_description: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    # None: every right of the owner (tokens made before scopes, login sessions)
    scopes: Mapped[list | None] = mapped_column(JSON, nullable=True)
    # written at most once a minute (auth.py): a write per request would serialise readers
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class OnetimeUrl(Timestamps, db.Model):
    """A one-time login string (stored as its SHA-256 digest); valid for about a minute."""
    __tablename__ = "onetime_urls"
    onetime_url_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    user_email: Mapped[str] = mapped_column(
        ForeignKey("users.user_email", ondelete="CASCADE", onupdate="CASCADE"), index=True)
    onetime_string_hash: Mapped[str] = mapped_column(String(64), unique=True)


class ServerParam(Timestamps, db.Model):
    __tablename__ = "server_params"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[object] = mapped_column(JSON)


class SystemState(db.Model):
    """Internal switches shared by server and worker (e.g. the plug-in job manager)."""
    __tablename__ = "system_state"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[object] = mapped_column(JSON)


GROUPS_STAMP = "groupsStamp"


@event.listens_for(Session, "before_flush")
def _renew_groups_stamp(session, _context, _instances):
    """Any change to a group renews the ``groupsStamp`` state in the same transaction, so
    that privileges cached under the old stamp (auth.py) are never used again."""
    changed = (session.new, session.dirty, session.deleted)
    if not any(isinstance(obj, Group) for objects in changed for obj in objects):
        return
    put_value(SystemState, GROUPS_STAMP, new_ulid(), session)


# --- projects and cases ---------------------------------------------------------------

class Project(Timestamps, db.Model):
    __tablename__ = "projects"
    project_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    project_name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(1024), default="")
    icon: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    case_attributes_schema: Mapped[dict] = mapped_column(JSON, default=dict)
    label_attributes_schema: Mapped[dict] = mapped_column(JSON, default=dict)
    window_presets: Mapped[list] = mapped_column(JSON, default=list)
    window_priority: Mapped[str] = mapped_column(String(64), default="dicom,auto")

    def to_json(self):
        return {"projectId": self.project_id, "projectName": self.project_name,
                "description": self.description, "icon": self.icon, "tags": self.tags,
                "caseAttributesSchema": self.case_attributes_schema,
                "labelAttributesSchema": self.label_attributes_schema,
                "windowPresets": self.window_presets, "windowPriority": self.window_priority,
                **self.timestamps()}


# --- series ---------------------------------------------------------------------------

class Series(Timestamps, db.Model):
    """One DICOM series; its files are dicom/<seriesUid>/<8-digit instance number>.dcm."""
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    images: Mapped[str] = mapped_column(Text)  # multi-integer-range string "1-3,5"
    series_date: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    modality: Mapped[str] = mapped_column(String(16), index=True)
    series_description: Mapped[str] = mapped_column(Text, default="")
    body_part: Mapped[str] = mapped_column(Text, default="")
    station_name: Mapped[str] = mapped_column(Text, default="")
    model_name: Mapped[str] = mapped_column(Text, default="")
    manufacturer: Mapped[str] = mapped_column(Text, default="")
    storage_id: Mapped[int] = mapped_column(Integer, default=0)
    patient_info: Mapped[dict] = mapped_column(JSON, default=dict)
    # Copies of patientInfo fields, so that searches use indexes on every database.
    patient_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    patient_name: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    patient_age: Mapped[int | None] = mapped_column(Integer, nullable=True)
    patient_sex: Mapped[str | None] = mapped_column(String(1), nullable=True)
    parameters: Mapped[dict] = mapped_column(JSON, default=dict)
    domain: Mapped[str] = mapped_column(String(128), index=True)
    # Study-level attributes as the header has them (DICOM networking and DICOMweb match on
    # them); None for series imported before they were kept (``index-instances`` fills them).
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True, index=True)
    study_time: Mapped[str | None] = mapped_column(String(16), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    study_description: Mapped[str | None] = mapped_column(Text, nullable=True)
    study_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    referring_physician_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)

    # (modality, seriesDate, domain) covers the common filtered search and its COUNT
    # without reading rows (the domain condition is always there).
    # (modality, study, series, domain): a DICOM search of one modality (QIDO-RS, C-FIND)
    # walks it in its answer's order and stops after a page.
    __table_args__ = (Index("ix_series_domain_created", "domain", "created_at"),
                      Index("ix_series_modality_date", "modality", "series_date", "domain"),
                      Index("ix_series_modality_study", "modality", "study_uid", "series_uid",
                            "domain"))

    def set_patient_info(self, info):
        """Store patientInfo and its indexed copies together."""
        for column, value in self.patient_columns(info).items():
            setattr(self, column, value)

    @staticmethod
    def patient_columns(info):
        """The column values of patientInfo ``info``: itself and its indexed copies."""
        info = dict(info or {})
        return {"patient_info": info, "patient_id": info.get("patientId"),
                "patient_name": info.get("patientName"), "patient_age": info.get("age"),
                "patient_sex": info.get("sex")}

    # The columns of a series document, in the order row_to_json unpacks them.
    DOCUMENT_COLUMNS = ("series_uid", "study_uid", "width", "height", "images", "series_date",
                        "modality", "series_description", "body_part", "station_name",
                        "model_name", "manufacturer", "storage_id", "parameters", "domain",
                        "created_at", "updated_at", "patient_info")

    @classmethod
    def document_columns(cls, as_text=False):
        """The table columns a list selects to build documents with ``row_to_json``; with
        ``as_text``, dates come as their ISO strings (``IsoDateTime``) and JSON columns as
        their stored text (for ``row_to_json(..., as_text=True)``, which passes it into
        the answer without decoding it)."""
        columns = [cls.__table__.c[name] for name in cls.DOCUMENT_COLUMNS]
        if as_text:
            columns = [cast(c, Text).label(c.name) if isinstance(c.type, JSON)
                       else type_coerce(c, IsoDateTime()).label(c.name)
                       if isinstance(c.type, DateTime) else c for c in columns]
        return columns

    def to_json(self, with_patient_info=True):
        """The series document."""
        return Series.row_to_json(tuple(getattr(self, name) for name in self.DOCUMENT_COLUMNS),
                                  with_patient_info)

    @staticmethod
    def row_to_json(row, with_patient_info=True, as_text=False):
        """The series document from the values of DOCUMENT_COLUMNS (a row or a tuple);
        unpacking a row costs a third of reading it by attribute. ``as_text``: the row
        is of ``document_columns(as_text=True)``."""
        (uid, study_uid, width, height, images, series_date, modality, description, body_part,
         station_name, model_name, manufacturer, storage_id, parameters, domain, created_at,
         updated_at, patient_info) = row
        if as_text:
            parameters = stored_json(parameters)
            patient_info = stored_json(patient_info) if with_patient_info else None
        else:
            series_date, created_at, updated_at = iso(series_date), iso(created_at), iso(updated_at)
        doc = {"seriesUid": uid, "studyUid": study_uid, "width": width, "height": height,
               "images": images, "seriesDate": series_date, "modality": modality,
               "seriesDescription": description, "bodyPart": body_part,
               "stationName": station_name, "modelName": model_name,
               "manufacturer": manufacturer, "storageId": storage_id,
               "parameters": parameters, "domain": domain,
               "createdAt": created_at, "updatedAt": updated_at}
        if with_patient_info:
            doc["patientInfo"] = patient_info or {}
        return doc


class Instance(db.Model):
    """One stored instance file of a series: what DICOM networking and DICOMweb address it
    by. Written by the import batch in the transaction that places the file."""
    __tablename__ = "instances"
    series_uid: Mapped[str] = mapped_column(
        String(64), ForeignKey("series.series_uid", ondelete="CASCADE"), primary_key=True)
    instance_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)


class DicomNode(Timestamps, db.Model):
    """A DICOM node (AE) the listener talks to: who may call, what it may do, where its
    stores go; ``port`` matters only for a node we send to (a C-MOVE destination)."""
    __tablename__ = "dicom_nodes"
    ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")  # "" admits any address
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    domain: Mapped[str] = mapped_column(String(128))
    allow: Mapped[list] = mapped_column(JSON, default=list)  # echo, store, find, get, move

    def to_json(self):
        return {"aeTitle": self.ae_title, "host": self.host, "port": self.port,
                "domain": self.domain, "allow": list(self.allow), **self.timestamps()}


class ClinicalCase(Timestamps, db.Model):
    __tablename__ = "clinical_cases"
    case_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.project_id"), index=True)
    tags: Mapped[list] = mapped_column(JSON, default=list)  # ordered; CaseTag mirrors it
    latest_revision: Mapped[dict] = mapped_column(JSON)
    revision_count: Mapped[int] = mapped_column(Integer, default=1)
    domains: Mapped[list] = mapped_column(JSON, default=list)
    # First series of the latest revision: where the derived patientInfo comes from.
    first_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)

    __table_args__ = (Index("ix_cases_project_created", "project_id", "created_at"),)


class CaseRevision(db.Model):
    """An immutable revision; nothing in the API updates or deletes one (except its case)."""
    __tablename__ = "case_revisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[str] = mapped_column(
        ForeignKey("clinical_cases.case_id", ondelete="CASCADE"), index=True)
    revision_index: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict] = mapped_column(JSON)  # creator, date, description, attributes, status, series
    __table_args__ = (UniqueConstraint("case_id", "revision_index"),)


class CaseTag(db.Model):
    __tablename__ = "case_tags"
    case_id: Mapped[str] = mapped_column(
        ForeignKey("clinical_cases.case_id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class CaseSeries(db.Model):
    """Every series referenced by any revision of a case (for DELETE /series checks)."""
    __tablename__ = "case_series"
    case_id: Mapped[str] = mapped_column(
        ForeignKey("clinical_cases.case_id", ondelete="CASCADE"), primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


# --- my lists -------------------------------------------------------------------------

class MyList(db.Model):
    __tablename__ = "my_lists"
    my_list_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    user_email: Mapped[str] = mapped_column(
        ForeignKey("users.user_email", ondelete="CASCADE", onupdate="CASCADE"), index=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    editors: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    def to_json(self):
        return {"myListId": self.my_list_id, "resourceType": self.resource_type,
                "name": self.name, "public": self.public, "editors": list(self.editors or []),
                "createdAt": iso(self.created_at)}


class MyListEditor(db.Model):
    """Index of my-list editors (mirrors MyList.editors) for sharedMyLists look-ups."""
    __tablename__ = "my_list_editors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    my_list_id: Mapped[str] = mapped_column(
        ForeignKey("my_lists.my_list_id", ondelete="CASCADE"), index=True)
    user_email: Mapped[str | None] = mapped_column(String(254), nullable=True, index=True)
    group_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class MyListItem(db.Model):
    __tablename__ = "my_list_items"
    my_list_id: Mapped[str] = mapped_column(
        ForeignKey("my_lists.my_list_id", ondelete="CASCADE"), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# --- tasks ----------------------------------------------------------------------------

class Task(Timestamps, db.Model):
    """A long-running operation of one user, run by the worker.

    The API status is processing | finished | error. ``claimed_by`` is null while the task
    waits for a worker; ``heartbeat_at`` lets a restarted worker detect tasks whose worker died.
    """
    __tablename__ = "tasks"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    user_email: Mapped[str] = mapped_column(String(254), index=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(64))  # which worker handler runs it
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="processing", index=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)  # latest progress
    finished: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    download_file_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    dismissed: Mapped[bool] = mapped_column(Boolean, default=False)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (Index("ix_tasks_queue", "status", "claimed_by", "created_at"),
                      Index("ix_tasks_user_created", "user_email", "created_at"))

    def to_json(self):
        return {"taskId": self.task_id, "userEmail": self.user_email, "name": self.name,
                "status": self.status, "errorMessage": self.error_message,
                "finishedMessage": self.finished_message, "endedAt": iso(self.ended_at),
                "downloadFileType": self.download_file_type, "dismissed": self.dismissed,
                **self.timestamps()}


# --- CIRCUS CS ------------------------------------------------------------------------

class PluginDefinition(Timestamps, db.Model):
    __tablename__ = "plugin_definitions"
    plugin_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    type: Mapped[str] = mapped_column(String(16), index=True)  # CAD | CAD+remote
    plugin_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(128), default="")
    run_configuration: Mapped[dict] = mapped_column(JSON, default=dict)
    icon: Mapped[dict] = mapped_column(JSON, default=dict)
    display_strategy: Mapped[list] = mapped_column(JSON, default=list)

    def to_json(self):
        return {"pluginId": self.plugin_id, "pluginName": self.plugin_name,
                "version": self.version, "type": self.type, "description": self.description,
                "runConfiguration": self.run_configuration, "icon": self.icon,
                "displayStrategy": self.display_strategy, **self.timestamps()}


class PluginJob(Timestamps, db.Model):
    """A plug-in job; while ``queue_state`` is set the job is also a queue item."""
    __tablename__ = "plugin_jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    plugin_id: Mapped[str] = mapped_column(String(128), index=True)
    user_email: Mapped[str] = mapped_column(String(254), index=True)
    status: Mapped[str] = mapped_column(String(16), default="in_queue", index=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    series: Mapped[list] = mapped_column(JSON)  # [{seriesUid, partialVolumeDescriptor, ...}]
    results: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    queue_state: Mapped[str | None] = mapped_column(String(16), nullable=True)  # wait|processing
    queued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Domain and first series, for searches that join series.
    domain: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    first_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)

    __table_args__ = (Index("ix_jobs_queue", "queue_state", "priority", "queued_at"),)


class PluginJobSeries(db.Model):
    """Series of a job, one row per position (for searches on series fields)."""
    __tablename__ = "plugin_job_series"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("plugin_jobs.job_id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)


class Feedback(db.Model):
    __tablename__ = "feedbacks"
    feedback_id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_ulid)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("plugin_jobs.job_id", ondelete="CASCADE"), index=True)
    user_email: Mapped[str] = mapped_column(String(254))
    is_consensual: Mapped[bool] = mapped_column(Boolean)
    data: Mapped[object] = mapped_column(JSON, nullable=True)
    action_log: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    def to_json(self):
        return {"feedbackId": self.feedback_id, "userEmail": self.user_email,
                "isConsensual": self.is_consensual, "data": self.data,
                "actionLog": self.action_log or [], "createdAt": iso(self.created_at)}



# --- the audit trail (audit.py) ----------------------------------------------------------

class AuditEvent(db.Model):
    """One append-only audit record; ``hash`` chains it to the record before it."""
    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # Two indexes only ("who did", "what was touched"): every index is pages written by every
    # audited commit; time follows seq closely enough for exports and pruning to scan.
    at: Mapped[datetime] = mapped_column(DateTime)
    user_email: Mapped[str | None] = mapped_column(String(254), nullable=True, index=True)
    token_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    target_id: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # canonical JSON text (sorted keys): hashed exactly as stored
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(db.Model):
    """The chain head: one row, locked only while a commit appends records."""
    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class LoginThrottle(db.Model):
    """Failed logins of one account or address ("user:<email>", "ip:<addr>")."""
    __tablename__ = "login_throttle"
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_start: Mapped[datetime] = mapped_column(DateTime)
    blocked_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
