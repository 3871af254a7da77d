"""Background tasks: /api/tasks."""
from flask import Blueprint, g, request

import tasks
from errors import ApiError
from models import Task, db
from search import search

bp = Blueprint("tasks", __name__, url_prefix="/api/tasks")

FILTER_FIELDS = {"taskId": Task.task_id, "status": Task.status, "dismissed": Task.dismissed}
SORT_FIELDS = {**FILTER_FIELDS, "name": Task.name, "createdAt": Task.created_at,
               "updatedAt": Task.updated_at, "endedAt": Task.ended_at}
PARSE_ERROR = "Filter string could not be parsed."


def _own_task(task_id):
    """The task if the caller owns it; 404 when unknown, 401 when someone else's."""
    task = db.session.get(Task, task_id)
    if task is None:
        raise ApiError(404, "The requested task was not found.")
    if task.user_email != g.user.user_email:
        raise ApiError(401, "You cannot access this task.")
    return task


@bp.get("")
def list_tasks():
    """Search the caller's tasks."""
    if len(request.args.getlist("filter")) > 1:
        raise ApiError(400, PARSE_ERROR)
    tasks.fail_interrupted()
    query = db.select(Task).where(Task.user_email == g.user.user_email)
    return search(query, FILTER_FIELDS, Task.to_json, {"createdAt": -1},
                  sort_fields=SORT_FIELDS, parse_error=PARSE_ERROR)


@bp.get("/<task_id>")
def get_task(task_id):
    """One of the caller's tasks."""
    return _own_task(task_id).to_json()
