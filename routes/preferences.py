"""The caller's preferences: /api/preferences."""
from flask import Blueprint, g

import accounts
from validation import expects

bp = Blueprint("preferences", __name__, url_prefix="/api/preferences")


@bp.get("")
def get_preferences():
    """The caller's preferences, every key present (defaults filled in)."""
    return accounts.effective_preferences(g.user)


@bp.patch("")
@expects("preferences-patch")
def patch_preferences(body):
    """Shallow-merge the given preference keys into the caller's stored preferences."""
    accounts.update_preferences(g.user, body)
    return "", 204
