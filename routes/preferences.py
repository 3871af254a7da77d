"""The caller's preferences: /api/preferences."""
from flask import Blueprint

bp = Blueprint("preferences", __name__, url_prefix="/api/preferences")
