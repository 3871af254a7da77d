"""Projects: /api/admin/projects."""
from flask import Blueprint

bp = Blueprint("admin_projects", __name__, url_prefix="/api/admin/projects")
