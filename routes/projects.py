"""Projects as their members see them: /api/projects."""
from flask import Blueprint

bp = Blueprint("projects", __name__, url_prefix="/api/projects")
