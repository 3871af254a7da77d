"""The CS job manager and queue: /api/admin/plugin-job-manager, /api/admin/plugin-job-queue."""
from flask import Blueprint, request

from errors import ApiError
from plugins import jobs
from validation import expects

bp = Blueprint("admin_plugin_job_manager", __name__)


@bp.get("/plugin-job-manager")
def get_manager():
    """Whether the job manager takes new jobs (`running`) or not (`stopped`)."""
    return {"status": jobs.manager_status()}


@bp.put("/plugin-job-manager/switch")
@expects("plugin-job-manager-switch")
def switch_manager(body):
    """Start or stop taking new jobs; running jobs finish, queued jobs stay."""
    if "status" not in body:
        raise ApiError(400, "Bad Request")
    return {"status": jobs.set_manager_status(body["status"])}


@bp.get("/plugin-job-queue")
def list_queue():
    """Every user's jobs in the queue (state wait, processing or all), priority first."""
    return jobs.queue_page(request.args)
