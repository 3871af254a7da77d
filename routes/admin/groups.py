"""Groups and global privileges: /api/admin/groups, /api/admin/global-privileges."""
from flask import Blueprint

import admin_records
import search
from auth import GLOBAL_PRIVILEGES
from models import Group, db
from validation import expects

bp = Blueprint("admin_groups", __name__)


@bp.get("/groups")
def list_groups():
    """Search groups (filter ignored; `unlimited` allowed)."""
    return search.run(admin_records.GROUP_SEARCH, db.select(Group))


@bp.get("/groups/<group_id>")
def get_group(group_id):
    """One group."""
    return admin_records.get_group(group_id).to_json()


@bp.patch("/groups/<group_id>")
@expects("group")
def patch_group(group_id, body):
    """Update some fields of a group (role consistency rules apply)."""
    admin_records.update_group(group_id, body)
    return "", 204


@bp.post("/groups")
@expects("group-create")
def create_group(body):
    """Create a group; the server assigns the next group ID."""
    return {"groupId": admin_records.create_group(body)}, 201


@bp.get("/global-privileges")
def list_global_privileges():
    """The global privileges a group may grant, with their captions."""
    return [{"privilege": name, "caption": caption} for name, caption in GLOBAL_PRIVILEGES]
