"""One-time login URLs: /api/admin/onetime-urls."""
from flask import Blueprint

bp = Blueprint("admin_onetime_urls", __name__, url_prefix="/api/admin/onetime-urls")
