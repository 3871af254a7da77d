"""Background tasks: /api/tasks."""
from flask import Blueprint

bp = Blueprint("tasks", __name__, url_prefix="/api/tasks")
