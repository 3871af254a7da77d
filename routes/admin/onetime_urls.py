"""One-time login URLs: /api/admin/onetime-urls (issueOnetime, not manageServer: auth.py)."""
from flask import Blueprint

import accounts
from validation import expects

bp = Blueprint("admin_onetime_urls", __name__, url_prefix="/onetime-urls")


@bp.post("")
@expects("onetime-url-request")
def create_onetime_url(body):
    """Issue a one-time login string for a user (valid about a minute, usable once)."""
    return {"onetimeString": accounts.issue_onetime(body["user"])}, 201
