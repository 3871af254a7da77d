"""The caller's queued plug-in jobs: /api/plugin-job-queue."""
from flask import Blueprint, g, request

from plugins import jobs

bp = Blueprint("plugin_job_queue", __name__, url_prefix="/api/plugin-job-queue")


@bp.get("")
def list_my_queue():
    """The caller's jobs in the queue (state wait, processing or all), priority first."""
    return jobs.queue_page(request.args, user_email=g.user.user_email)
