"""The CS job manager and queue: /api/admin/plugin-job-manager, /api/admin/plugin-job-queue."""
from flask import Blueprint

bp = Blueprint("admin_plugin_job_manager", __name__, url_prefix="/api/admin")
