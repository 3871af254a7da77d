"""User accounts: /api/admin/users."""
from flask import Blueprint

bp = Blueprint("admin_users", __name__, url_prefix="/api/admin/users")
