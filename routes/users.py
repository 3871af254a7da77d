"""Public user profiles: /api/users/<userEmail>."""
from flask import Blueprint

import accounts

bp = Blueprint("users", __name__, url_prefix="/api/users")


@bp.get("/<user_email>")
def get_user(user_email):
    """A user's e-mail, login ID and description (any authenticated caller)."""
    return accounts.public_profile(user_email)
