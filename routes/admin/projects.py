"""Projects: /api/admin/projects."""
from flask import Blueprint

import admin_records
import search
from models import Project, db
from validation import expects

bp = Blueprint("admin_projects", __name__, url_prefix="/projects")


@bp.get("")
def list_projects():
    """Search projects (filter ignored; `unlimited` allowed)."""
    return search.run(admin_records.PROJECT_SEARCH, db.select(Project))


@bp.get("/<project_id>")
def get_project(project_id):
    """One project."""
    return admin_records.get_project(project_id).to_json()


@bp.patch("/<project_id>")
@expects("project")
def patch_project(project_id, body):
    """Update some fields of a project."""
    admin_records.update_project(project_id, body)
    return "", 204


@bp.post("")
@expects("project-create")
def create_project(body):
    """Create a project under a new ULID."""
    return {"projectId": admin_records.create_project(body)}, 201
