"""Liveness: /api/status."""
from flask import Blueprint

bp = Blueprint("status", __name__, url_prefix="/api")


@bp.get("/status")
def get_status():
    """Answer that the server is running (no token needed)."""
    return {"status": "running"}
