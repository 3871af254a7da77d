"""DICOM series: /api/series."""
from flask import Blueprint

bp = Blueprint("series", __name__, url_prefix="/api/series")
