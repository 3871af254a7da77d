"""Plug-in jobs: /api/plugin-jobs."""
from flask import Blueprint

bp = Blueprint("plugin_jobs", __name__, url_prefix="/api/plugin-jobs")
