"""Clinical cases: /api/cases."""
from flask import Blueprint

bp = Blueprint("cases", __name__, url_prefix="/api/cases")
