"""Projects as their members see them: /api/projects."""
from flask import Blueprint

from auth import project_role_refusal, require_project_role
from models import Project, db

bp = Blueprint("projects", __name__, url_prefix="/api/projects")


@bp.get("/<project_id>")
def get_project(project_id):
    """One project the caller may read (unknown or not readable: 401)."""
    require_project_role(project_id, "read")
    project = db.session.get(Project, project_id)
    if project is None:  # a group may still name a deleted project; never 404 here (2.4)
        raise project_role_refusal("read")
    return project.to_json()
