"""The caller's queued plug-in jobs: /api/plugin-job-queue."""
from flask import Blueprint

bp = Blueprint("plugin_job_queue", __name__, url_prefix="/api/plugin-job-queue")
