"""Volume exports as tasks: /api/series/export-cs-volume, /api/cases/export-mhd."""
from flask import Blueprint

bp = Blueprint("exports", __name__, url_prefix="/api")
