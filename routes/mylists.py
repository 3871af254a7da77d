"""My lists: /api/mylists."""
from flask import Blueprint

bp = Blueprint("mylists", __name__, url_prefix="/api/mylists")
