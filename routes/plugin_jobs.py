"""Plug-in jobs: /api/plugin-jobs."""
import mimetypes

from flask import Blueprint, g, send_file

import my_lists
import search
from auth import can_view_personal_info
from plugins import jobs
from validation import expects

bp = Blueprint("plugin_jobs", __name__, url_prefix="/api/plugin-jobs")


def _job_check(role):
    """A ``before=`` hook: 404/401 for the job before its body is validated (2.4)."""
    return lambda job_id, **_: jobs.job_for(job_id, role)


def _search(my_list=None):
    spec = jobs.search_spec(g.privileges, can_view_personal_info(),
                                   in_my_list=my_list is not None)
    return search.run(spec, jobs.search_query(g.privileges, my_list))


@bp.post("")
@expects("plugin-job-create")
def create_job(body):
    """Queue a plug-in job (needs readPlugin and executePlugin on the plug-in)."""
    return {"jobId": jobs.register_job(g.user.user_email, g.privileges, body)}, 201


@bp.get("")
def list_jobs():
    """Search the jobs the caller may read."""
    return _search()


@bp.get("/list/<my_list_id>")
def list_jobs_in_my_list(my_list_id):
    """Search the jobs of one of the caller's my lists."""
    return _search(my_lists.list_for_search(my_list_id, "pluginJobs"))


@bp.get("/<job_id>")
def get_job(job_id):
    """One job with its results and feedback."""
    return jobs.job_document(jobs.job_for(job_id, "readPlugin"))


@bp.patch("/<job_id>")
@expects("plugin-job-patch", before=_job_check("executePlugin"))
def patch_job(job_id, body):
    """Cancel a queued job or invalidate a finished one."""
    jobs.change_status(jobs.job_for(job_id, "executePlugin"), body["status"])
    return "", 204


@bp.get("/<job_id>/attachment")
def list_attachments(job_id):
    """Paths of the job's result files."""
    job = jobs.job_for(job_id, "readPlugin")
    return jobs.attachment_list(job.job_id)


@bp.get("/<job_id>/attachment/<path:path>")
def get_attachment(job_id, path):
    """One result file of the job."""
    job = jobs.job_for(job_id, "readPlugin")
    full = jobs.attachment_path(job.job_id, path)
    mimetype = mimetypes.guess_type(full)[0] or "application/octet-stream"
    return send_file(full, mimetype=mimetype, conditional=True)


@bp.post("/<job_id>/feedback/consensual")
@expects("plugin-job-feedback", before=_job_check("inputConsensualFeedback"))
def post_consensual_feedback(job_id, body):
    """Register the consensual feedback of a job."""
    job = jobs.job_for(job_id, "inputConsensualFeedback")
    return {"feedbackId": jobs.add_feedback(job, g.user.user_email, True, body)}


@bp.post("/<job_id>/feedback/personal")
@expects("plugin-job-feedback", before=_job_check("inputPersonalFeedback"))
def post_personal_feedback(job_id, body):
    """Register the caller's personal feedback on a job."""
    job = jobs.job_for(job_id, "inputPersonalFeedback")
    return {"feedbackId": jobs.add_feedback(job, g.user.user_email, False, body)}


@bp.get("/<job_id>/feedback")
def list_feedback(job_id):
    """The feedback entries of a job."""
    job = jobs.job_for(job_id, "readPlugin")
    return jobs.feedbacks_of([job.job_id])[job.job_id]


@bp.delete("/<job_id>/feedback/<feedback_id>")
def delete_feedback(job_id, feedback_id):
    """Delete one feedback entry, or all of them with `all`."""
    jobs.delete_feedback(jobs.job_for(job_id, "manageFeedback"), feedback_id)
    return "", 204
