"""User accounts: /api/admin/users."""
from flask import Blueprint

import admin_records
import search
from models import User, db
from validation import expects

bp = Blueprint("admin_users", __name__, url_prefix="/users")


@bp.get("")
def list_users():
    """Search users (filter ignored; passwords never returned)."""
    return search.run(admin_records.USER_SEARCH, lambda: db.select(*User.public_columns()),
                      memo="admin/users")


@bp.get("/<user_email>")
def get_user(user_email):
    """One user, without the password."""
    return admin_records.get_user(user_email).to_json()


@bp.patch("/<user_email>")
@expects("user")
def patch_user(user_email, body):
    """Update some fields of a user; a new password is stored hashed."""
    admin_records.update_user(user_email, body)
    return "", 204


@bp.post("")
@expects("user-create")
def create_user(body):
    """Create a user (duplicate e-mail or login ID: 409)."""
    return {"userEmail": admin_records.create_user(body)}, 201
