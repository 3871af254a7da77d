"""Background tasks: /api/tasks."""
from flask import Blueprint, Response, current_app, g, request
from werkzeug.wsgi import wrap_file

import search
import tasks
from auth import owns_task, require_task_owner
from errors import ApiError
from models import Task, db
from validation import json_body

bp = Blueprint("tasks", __name__, url_prefix="/api/tasks")



def _task(task_id):
    task = db.session.get(Task, task_id)
    if task is None:
        raise ApiError(404, "The requested task was not found.")
    return task


def _own_task(task_id):
    """The task if the caller owns it; 404 when unknown, 401 when someone else's."""
    task = _task(task_id)
    require_task_owner(task)
    return task


@bp.get("")
def list_tasks():
    """Search the caller's tasks."""
    if len(request.args.getlist("filter")) > 1:
        raise ApiError(400, tasks.SEARCH.parse_error)
    tasks.fail_interrupted()
    query = db.select(Task).where(Task.user_email == g.user.user_email)
    return search.run(tasks.SEARCH, query)


@bp.get("/report")
def report_tasks():
    """Stream the progress of the caller's tasks as Server-Sent Events."""
    stream = tasks.report_stream(db.engine, g.user.user_email,
                                 current_app.config["TASK_REPORT_POLL_INTERVAL"])
    db.session.remove()  # the stream uses pooled connections of its own, per poll
    return Response((chunk for chunk in stream if chunk), content_type="text/event-stream",
                    headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"})


@bp.get("/<task_id>")
def get_task(task_id):
    """One of the caller's tasks."""
    return _own_task(task_id).to_json()


@bp.get("/<task_id>/download")
def download_task_file(task_id):
    """Download the file a finished task produced."""
    task = _task(task_id)
    if not owns_task(task):  # the issue: no hint that the task exists
        raise ApiError(404, "The requested task was not found.")
    if not task.download_file_type:
        raise ApiError(400, "This task is not associated with a downloadable file.")
    if task.status != "finished":
        raise ApiError(409, "This task has not been completed.")
    try:
        fh, size = tasks.open_download(task)
    except tasks.DownloadGone:
        raise ApiError(404, f"The requested download file for the task {task_id} "
                       "is no longer available.") from None
    mime = task.download_file_type
    response = Response(wrap_file(request.environ, fh), direct_passthrough=True,
                        content_type="application/gzip" if mime == "application/x-tgz" else mime)
    response.content_length = size
    response.headers["Content-Disposition"] = \
        f'attachment; filename="download.{tasks.download_extension(mime)}"'
    return response


@bp.patch("/<task_id>")
def patch_task(task_id):
    """Dismiss (or un-dismiss) one of the caller's ended tasks."""
    task = _own_task(task_id)
    body = json_body()
    if not isinstance(body, dict) or set(body) != {"dismissed"} \
            or not isinstance(body["dismissed"], bool):
        raise ApiError(400)
    if task.status == "processing":  # quirk 15: error tasks may be dismissed too
        raise ApiError(400, "The task is not completed yet.")
    tasks.dismiss(task, body["dismissed"])
    return "", 204
