"""Plug-in jobs (API.md 3.6, 3.7, 3.18, 4.12, 4.13, 5.1, 5.2): registration, access, search,
the queue, state changes and feedback.

A job row is also its queue item while ``queue_state`` is set: ``wait`` (queued) or
``processing`` (claimed by a worker). Every state change that can race (claim, cancel,
invalidate, finish) is one conditional UPDATE, so exactly one of two racing parties wins.
"""
import logging
import os

import sqlalchemy as sa

import tasks
import storage
from auth import (compute_privileges, find_user, personal_info_plugin_ids, readable_domains,
                  readable_plugin_ids, require_job_domains, require_job_invalidation,
                  require_job_series_domain, require_plugin_execution, require_plugin_role)
from errors import ApiError, get_or_404
from models import (Feedback, MyListItem, PluginDefinition, PluginJob, PluginJobSeries, Series,
                    SystemState, db, iso, new_ulid, parse_iso, utcnow, put_value)
from plugins import definitions
from search import ArrayField, SearchSpec
from series import (check_pvd_range, get_series, parse_ranges, pvd_images, resolve_pvd,
                    validate_pvd)
from validation import validate

log = logging.getLogger(__name__)

MANAGER_KEY = "plugin_job_manager"
MANAGER_STATES = ("running", "stopped")
SEARCH_COUNT_CAP = 10000
NOT_DUPLICATES = ("invalidated", "failed", "cancelled")
QUEUE_STATES = ("wait", "processing")
BAD_PATH = "Invalid path prameter."  # (sic), as CIRCUS words it


class JobStateError(ApiError):
    """Raised when a job cannot be cancelled or invalidated in its current state (422)."""

    def __init__(self, message):
        super().__init__(422, message)


class FeedbackError(ApiError):
    """Raised when a feedback rule of API.md 3.6 is violated (400)."""

    def __init__(self, message):
        super().__init__(400, message)


# --- documents --------------------------------------------------------------------------

def feedbacks_of(job_ids):
    """job ID -> its feedback documents in creation order (one query for a page)."""
    result = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return result
    rows = db.session.execute(db.select(Feedback).where(Feedback.job_id.in_(list(job_ids)))
                              .order_by(Feedback.created_at, Feedback.feedback_id)).scalars()
    for feedback in rows:
        result[feedback.job_id].append(feedback.to_json())
    return result


def job_json(job, feedbacks, with_results=True):
    """The job document (4.12) with CIRCUS's field names."""
    doc = {"jobId": job.job_id, "pluginId": job.plugin_id, "userEmail": job.user_email,
           "status": job.status, "errorMessage": job.error_message,
           "series": job.series, "feedbacks": feedbacks,
           "startedAt": iso(job.started_at), "finishedAt": iso(job.finished_at)}
    if with_results:
        doc["results"] = job.results
    doc.update(job.timestamps())
    return doc


def job_document(job):
    """The full document of one job, results and feedbacks included."""
    return job_json(job, feedbacks_of([job.job_id])[job.job_id])


# --- registration -----------------------------------------------------------------------

def parse_series_argument(text):
    """``UID`` or ``UID:start:end:delta`` (CLI form) -> a series entry of a job request.

    Without a range the first contiguous run of images is used with delta 1, as CIRCUS's
    CLI does (not ``auto``). ApiError 400/404 for a malformed argument or unknown series.
    """
    parts = text.split(":")
    if len(parts) == 1:
        ranges = parse_ranges(get_series(parts[0]).images)
        if not ranges:
            raise ApiError(400, f"Series {parts[0]} has no image.")
        return {"seriesUid": parts[0], "partialVolumeDescriptor": {
            "start": ranges[0][0], "end": ranges[0][1], "delta": 1}}
    if len(parts) != 4:
        raise ApiError(400, f"Expected SERIES or SERIES:start:end:delta, got {text!r}.")
    try:
        start, end, delta = (int(p) for p in parts[1:])
    except ValueError:
        raise ApiError(400, f"start, end and delta must be integers in {text!r}.") from None
    return {"seriesUid": parts[0],
            "partialVolumeDescriptor": {"start": start, "end": end, "delta": delta}}


def register_job_as(plugin, user, series_arguments, priority=0):
    """``register-plugin-job``: queue a job as a user (e-mail or login ID) on a plug-in
    (ID or name); the same checks as POST /api/plugin-jobs. Return the job ID."""
    account = find_user(user)
    if account is None:
        raise ApiError(404, "Specified user does not exist.")
    definition = db.session.execute(db.select(PluginDefinition).where(sa.or_(
        PluginDefinition.plugin_id == plugin, PluginDefinition.plugin_name == plugin))
        .order_by(PluginDefinition.created_at)).scalars().first()
    if definition is None:
        raise ApiError(404, "Specified plugin does not exist.")
    body = {"pluginId": definition.plugin_id, "priority": priority,
            "series": [parse_series_argument(text) for text in series_arguments]}
    validate(body, "plugin-job-create")
    return register_job(account.user_email, compute_privileges(account), body)


def _same_request(job, entries):
    if len(job.series or []) != len(entries):
        return False
    for old, new in zip(job.series, entries):
        old_pvd, new_pvd = old.get("partialVolumeDescriptor") or {}, new["partialVolumeDescriptor"]
        if old.get("seriesUid") != new["seriesUid"]:
            return False
        if any(old_pvd.get(k) != new_pvd.get(k) for k in ("start", "end", "delta")):
            return False
    return True


def _duplicate_exists(plugin_id, entries):
    candidates = db.session.execute(db.select(PluginJob).where(
        PluginJob.plugin_id == plugin_id,
        PluginJob.first_series_uid == entries[0]["seriesUid"],
        PluginJob.status.not_in(NOT_DUPLICATES))).scalars()
    return any(_same_request(job, entries) for job in candidates)


def _check_files(series, pvd):
    """The queue's re-check: every DICOM file of the PVD is on disk (400, not CIRCUS's 500)."""
    for number in pvd_images(pvd):
        if not os.path.isfile(storage.instance_path(series.series_uid, number)):
            raise ApiError(400, f"Series {series.series_uid} not found.")


def register_job(user_email, privileges, body):
    """Validate a job request (3.6 steps 1-5) and queue the job; return its ID.

    Parameters
    ----------
    user_email : str
        The creator.
    privileges : auth.Privileges
        The creator's privileges (readPlugin + executePlugin, domains).
    body : dict
        ``{pluginId, series: [{seriesUid, partialVolumeDescriptor, requiredPrivateTags?}],
        priority?, force?}``, already shape-checked by ``plugin-job-create.yaml``.
    """
    entries = []
    for item in body["series"]:
        entry = {"seriesUid": item["seriesUid"],
                 "partialVolumeDescriptor": resolve_pvd(
                     item["seriesUid"], item["partialVolumeDescriptor"])}
        if "requiredPrivateTags" in item:
            entry["requiredPrivateTags"] = item["requiredPrivateTags"]
        entries.append(entry)
    plugin = definitions.get_plugin(body["pluginId"])
    require_plugin_execution(plugin.plugin_id, privileges)
    if body.get("force") is not True and _duplicate_exists(plugin.plugin_id, entries):
        raise ApiError(400, "There is a duplicate job that is already registered.")
    uids = [e["seriesUid"] for e in entries]
    rows = {s.series_uid: s for s in db.session.execute(
        db.select(Series).where(Series.series_uid.in_(uids))).scalars()}
    for entry in entries:
        series = rows.get(entry["seriesUid"])
        if series is None:
            raise ApiError(400, "Nonexistent series.")
        validate_pvd(entry["partialVolumeDescriptor"])
        check_pvd_range(series, entry["partialVolumeDescriptor"])
        require_job_series_domain(series, privileges)
    domains = {rows[uid].domain for uid in uids}
    if len(domains) > 1:
        raise ApiError(400, "All series must belong to the same domain.")
    for entry in entries:
        _check_files(rows[entry["seriesUid"]], entry["partialVolumeDescriptor"])
    now = utcnow()
    job = PluginJob(job_id=new_ulid(), plugin_id=plugin.plugin_id, user_email=user_email,
                    status="in_queue", error_message=None, series=entries, results=None,
                    started_at=None, finished_at=None, priority=int(body.get("priority", 0)),
                    queue_state="wait", queued_at=now, claimed_by=None,
                    domain=domains.pop(), first_series_uid=uids[0], created_at=now,
                    updated_at=now)
    db.session.add(job)
    db.session.add_all(PluginJobSeries(job_id=job.job_id, position=i, series_uid=uid)
                       for i, uid in enumerate(uids))
    db.session.commit()
    log.info("Job %s of plug-in %s queued by %s.", job.job_id, plugin.plugin_id, user_email)
    return job.job_id


# --- access to one job ------------------------------------------------------------------

def get_job(job_id):
    """The job, else ApiError 404 ``The requested pluginJob was not found.``"""
    return get_or_404(PluginJob, job_id, "pluginJob")


def series_domains(job_id):
    """Domains of the job's series that still exist."""
    return set(db.session.execute(
        db.select(Series.domain).join(PluginJobSeries,
                                      PluginJobSeries.series_uid == Series.series_uid)
        .where(PluginJobSeries.job_id == job_id)).scalars())


def job_for(job_id, role):
    """The job if the caller holds ``role`` on its plug-in and every domain of its series
    (2.4 steps 3-4), else 404 / 401."""
    job = get_job(job_id)
    require_plugin_role(job.plugin_id, role)
    require_job_domains(series_domains(job.job_id))
    return job


# --- cancel and invalidate --------------------------------------------------------------

def change_status(job, new_status):
    """Cancel a queued job or invalidate a finished one (3.6 PATCH), race-free."""
    if new_status == "invalidated":
        require_job_invalidation(job)
        if job.status != "finished":
            raise JobStateError(
                f'You cannot invalidate this job because its status is "{job.status}".')
        changed = db.session.execute(sa.update(PluginJob).where(
            PluginJob.job_id == job.job_id, PluginJob.status == "finished")
            .values(status="invalidated")).rowcount
    else:
        if job.status != "in_queue":
            raise JobStateError(
                f'You cannot cancel this job because its status is "{job.status}".')
        # Only a job still waiting in the queue can be cancelled: the same condition a
        # worker's claim tests, so exactly one of the two wins.
        changed = db.session.execute(sa.update(PluginJob).where(
            PluginJob.job_id == job.job_id, PluginJob.queue_state == "wait")
            .values(status="cancelled", queue_state=None)).rowcount
        if changed != 1:
            db.session.rollback()
            raise JobStateError(
                "You cannot cancel this job because it is already being processed.")
    if changed != 1:
        db.session.rollback()
        current = db.session.get(PluginJob, job.job_id)
        raise JobStateError(f'You cannot invalidate this job because its status is '
                            f'"{current.status if current else "unknown"}".')
    db.session.commit()


# --- search -----------------------------------------------------------------------------

def _series_field(column, *extra):
    """A field over the job's series joined with the series table (any element matches)."""
    return ArrayField(column, PluginJobSeries.job_id == PluginJob.job_id,
                      Series.series_uid == PluginJobSeries.series_uid, *extra)


def search_fields(privileges):
    """Filter keys of the job search (1.8); ``patientInfo.*`` see only role-unmasked values."""
    viewable = PluginJob.plugin_id.in_(personal_info_plugin_ids(privileges))
    return {
        "pluginId": PluginJob.plugin_id, "jobId": PluginJob.job_id, "status": PluginJob.status,
        "patientInfo.patientId": _series_field(Series.patient_id, viewable),
        "patientInfo.patientName": _series_field(Series.patient_name, viewable),
        "patientInfo.age": _series_field(Series.patient_age, viewable),
        "patientInfo.sex": _series_field(Series.patient_sex, viewable),
        "seriesUid": ArrayField(PluginJobSeries.series_uid,
                                PluginJobSeries.job_id == PluginJob.job_id),
        "studyUid": _series_field(Series.study_uid),
        "seriesDate": _series_field(Series.series_date),
        "modality": _series_field(Series.modality),
        "createdAt": PluginJob.created_at, "updatedAt": PluginJob.updated_at,
        "finishedAt": PluginJob.finished_at,
    }


SORT_FIELDS = {"pluginId": PluginJob.plugin_id, "jobId": PluginJob.job_id,
               "status": PluginJob.status, "userEmail": PluginJob.user_email,
               "createdAt": PluginJob.created_at, "updatedAt": PluginJob.updated_at,
               "startedAt": PluginJob.started_at, "finishedAt": PluginJob.finished_at}
LIST_SORT_FIELDS = {**SORT_FIELDS, "addedToListAt": MyListItem.created_at}


def search_query(privileges, my_list=None):
    """Jobs the caller may find: readPlugin on the plug-in and at least one still existing
    series in one of the caller's domains; restricted to a my list when given."""
    in_domain = sa.exists().where(PluginJobSeries.job_id == PluginJob.job_id,
                                  Series.series_uid == PluginJobSeries.series_uid,
                                  Series.domain.in_(readable_domains(privileges)))
    query = db.select(PluginJob).where(
        PluginJob.plugin_id.in_(readable_plugin_ids(privileges)), in_domain)
    if my_list is not None:
        query = query.join(MyListItem, sa.and_(MyListItem.resource_id == PluginJob.job_id,
                                               MyListItem.my_list_id == my_list.my_list_id))
    return query


def _first_series(job_ids):
    """job ID -> its first still existing series (by position), one query for a page."""
    rows = db.session.execute(
        db.select(PluginJobSeries.job_id, Series)
        .join(Series, Series.series_uid == PluginJobSeries.series_uid)
        .where(PluginJobSeries.job_id.in_(list(job_ids)))
        .order_by(PluginJobSeries.job_id, PluginJobSeries.position))
    first = {}
    for job_id, series in rows:
        first.setdefault(job_id, series)
    return first


def search_serializer(privileges, personal_info_allowed):
    """A batch serializer for search pages: documents without results, plus ``domain`` and
    ``patientInfo`` (2.6: plug-in roles readPlugin + viewPersonalInfo, global privilege and
    preference)."""
    viewable = set(personal_info_plugin_ids(privileges))

    def serialize(jobs):
        ids = [job.job_id for job in jobs]
        feedbacks, first = feedbacks_of(ids), _first_series(ids)
        items = []
        for job in jobs:
            doc = job_json(job, feedbacks[job.job_id], with_results=False)
            series = first.get(job.job_id)
            doc["domain"] = series.domain if series is not None else job.domain
            if series is not None and personal_info_allowed and job.plugin_id in viewable:
                doc["patientInfo"] = series.patient_info or {}
            items.append(doc)
        return items
    serialize.many = True
    return serialize


def search_spec(privileges, personal_info_allowed, in_my_list=False):
    """The job search for this caller (``in_my_list``: of a my list, see ``search_query``)."""
    return SearchSpec(
        search_fields(privileges), search_serializer(privileges, personal_info_allowed),
        {"addedToListAt": -1} if in_my_list else {"createdAt": -1},
        sort_fields=LIST_SORT_FIELDS if in_my_list else SORT_FIELDS,
        count_cap=SEARCH_COUNT_CAP, sort_error="Invalid sort parameter.")


# --- attachments ------------------------------------------------------------------------

def attachment_list(job_id):
    """Relative paths of every file and folder in the job's results folder (no dot-files,
    no links), sorted; ``[]`` when there is none."""
    base = storage.results_dir(job_id)
    found = []
    for folder, dirs, files in os.walk(base, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not os.path.islink(os.path.join(folder, d))]
        relative = os.path.relpath(folder, base)
        for name in dirs + [f for f in files if not f.startswith(".")
                            and not os.path.islink(os.path.join(folder, f))]:
            path = name if relative == "." else os.path.join(relative, name)
            found.append(path.replace(os.sep, "/"))
    return sorted(found)


def attachment_path(job_id, path):
    """The absolute path of one result file; 400 ``Invalid path prameter.`` for a path that
    could leave the results folder (``..``, absolute, a link out), 404 for no such file."""
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or any(p in ("..", ".") for p in parts) or "\x00" in path:
        raise ApiError(400, BAD_PATH)
    base = storage.results_dir(job_id)
    try:
        full = storage.inside(base, *[p for p in parts if p])
    except storage.UnsafePathError:
        raise ApiError(400, BAD_PATH) from None
    if not os.path.isfile(full):
        raise ApiError(404, "Not Found")
    return full


# --- feedback ---------------------------------------------------------------------------

def _lock_job(job_id):
    """Serialise feedback changes of one job (row lock on PostgreSQL, write lock on SQLite);
    also refreshes the job's updatedAt, as CIRCUS's update does."""
    db.session.execute(sa.update(PluginJob).where(PluginJob.job_id == job_id)
                       .values(updated_at=utcnow()))


def _action_log(items):
    result = []
    for i, item in enumerate(items or []):
        try:
            date = iso(parse_iso(item["date"]))
        except ValueError:
            raise ApiError(400, "Request data is not correct.", validationErrors=[{
                "keyword": "format", "dataPath": f".actionLog[{i}].date",
                "schemaPath": "#/properties/actionLog/items/properties/date/format",
                "params": {"format": "date-time"},
                "message": 'should match format "date-time"'}]) from None
        entry = {"date": date, "action": item["action"]}
        if "data" in item:
            entry["data"] = item["data"]
        result.append(entry)
    return result


def add_feedback(job, user_email, consensual, body):
    """Append a personal or consensual feedback (3.6 rules); return its ID."""
    action_log = _action_log(body.get("actionLog"))
    _lock_job(job.job_id)
    existing = db.session.execute(db.select(Feedback).where(
        Feedback.job_id == job.job_id)).scalars().all()
    if any(f.is_consensual for f in existing):
        db.session.rollback()
        raise FeedbackError("A consensual feedback has been already registered.")
    if not consensual and any(f.user_email == user_email for f in existing):
        db.session.rollback()
        raise FeedbackError("Personal feedback of this user has been already registered.")
    feedback = Feedback(feedback_id=new_ulid(), job_id=job.job_id, user_email=user_email,
                        is_consensual=consensual, data=body.get("data"),
                        action_log=action_log, created_at=utcnow())
    db.session.add(feedback)
    db.session.commit()
    return feedback.feedback_id


def delete_feedback(job, feedback_id):
    """Delete one feedback, or every one with ``all`` (3.6 rules)."""
    _lock_job(job.job_id)
    existing = db.session.execute(db.select(Feedback).where(
        Feedback.job_id == job.job_id)).scalars().all()
    if feedback_id == "all":
        db.session.execute(sa.delete(Feedback).where(Feedback.job_id == job.job_id))
    else:
        target = next((f for f in existing if f.feedback_id == feedback_id), None)
        if target is None:
            db.session.rollback()
            raise ApiError(404, "Feedback not found.")
        if not target.is_consensual and any(f.is_consensual for f in existing):
            db.session.rollback()
            raise FeedbackError("Cannot delete personal feedback when consensual feedback exists.")
        db.session.delete(target)
    db.session.commit()


# --- the queue --------------------------------------------------------------------------

def _int_arg(args, name, default):
    try:
        value = int(args.get(name, default))
    except (TypeError, ValueError):
        return default
    return value if value >= 1 else default


def queue_page(args, user_email=None):
    """The queue (3.7, 3.18): jobs waiting or processing, priority first then FIFO, as full
    job documents; only ``user_email``'s jobs when given. No 200-item limit."""
    state = args.get("state")
    states = {"processing": ("processing",), "all": QUEUE_STATES}.get(state, ("wait",))
    limit, page = _int_arg(args, "limit", 20), _int_arg(args, "page", 1)
    query = db.select(PluginJob).where(PluginJob.queue_state.in_(states))
    if user_email is not None:
        query = query.where(PluginJob.user_email == user_email)
    total = db.session.execute(db.select(sa.func.count()).select_from(
        query.subquery())).scalar_one()
    jobs = db.session.execute(query.order_by(*QUEUE_ORDER).limit(limit)
                              .offset(limit * (page - 1))).scalars().all()
    feedbacks = feedbacks_of([job.job_id for job in jobs])
    return {"items": [job_json(job, feedbacks[job.job_id]) for job in jobs],
            "page": page, "totalItems": total}


QUEUE_ORDER = (PluginJob.priority.desc(), PluginJob.queued_at, PluginJob.job_id)


def manager_status():
    """``running`` or ``stopped``: whether workers take new jobs (running unless switched)."""
    state = db.session.get(SystemState, MANAGER_KEY)
    return state.value if state is not None and state.value in MANAGER_STATES else "running"


def set_manager_status(status):
    """Switch the job manager; a stopped manager lets running jobs finish and takes no new
    one (queued jobs stay queued)."""
    if status not in MANAGER_STATES:
        raise ApiError(400, "Bad Request")
    put_value(SystemState, MANAGER_KEY, status)
    db.session.commit()
    log.info("Plug-in job manager switched to %s.", status)
    return status


def claim_next_job(worker_id):
    """Atomically take the highest-priority, oldest waiting job; return its ID or None.

    Nothing is taken while the manager is stopped. The conditional UPDATE (and SKIP LOCKED
    on PostgreSQL) makes the claim exactly-once among any number of workers, and a
    cancellation racing with the claim loses or wins as a whole.
    """
    if manager_status() != "running":
        db.session.rollback()
        return None
    db.session.rollback()  # end the read transaction before the claim's own one
    candidate = (sa.select(PluginJob.job_id).where(PluginJob.queue_state == "wait")
                 .order_by(*QUEUE_ORDER).limit(1))
    return tasks.claim_first(candidate, lambda job_id: sa.update(PluginJob).where(
        PluginJob.job_id == job_id, PluginJob.queue_state == "wait").values(
        queue_state="processing", status="processing", started_at=utcnow(),
        claimed_by=worker_id, updated_at=PluginJob.updated_at))


def _end(job_id, **values):
    """Write the end of a processing job in a transaction of its own (updatedAt untouched,
    as the reference's runner does); return whether the job was still processing."""
    with db.engine.begin() as conn:
        return conn.execute(sa.update(PluginJob).where(
            PluginJob.job_id == job_id, PluginJob.status == "processing").values(
            queue_state=None, updated_at=PluginJob.updated_at, **values)).rowcount == 1


def finish_job(job_id, results):
    """Mark a processing job finished with its validated results."""
    return _end(job_id, status="finished", results=results, finished_at=utcnow(),
                error_message=None)


def fail_job(job_id, message):
    """Mark a processing job failed with a user-facing message (finishedAt stays null)."""
    return _end(job_id, status="failed", error_message=message)


def processing_jobs():
    """(job ID, claimed_by) of every job a worker holds."""
    return db.session.execute(db.select(PluginJob.job_id, PluginJob.claimed_by).where(
        PluginJob.queue_state == "processing")).all()

