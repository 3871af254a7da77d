"""Groups and global privileges: /api/admin/groups, /api/admin/global-privileges."""
from flask import Blueprint

bp = Blueprint("admin_groups", __name__, url_prefix="/api/admin")
