"""My lists: /api/mylists.

As in CIRCUS, the body is validated before the list is looked up (ownership and editor
checks are the handler's, not route-level privileges).
"""
from flask import Blueprint, g, jsonify

import my_lists
from auth import require_my_list_editable, require_my_list_owner, require_my_list_readable
from validation import expects

bp = Blueprint("mylists", __name__, url_prefix="/api/mylists")


@bp.get("")
def list_my_lists():
    """The caller's own my lists (headers only)."""
    return jsonify([lst.to_json() for lst in my_lists.own_lists(g.user.user_email)])


@bp.get("/<my_list_id>")
def get_my_list(my_list_id):
    """One my list with its resource IDs in insertion order."""
    my_list = my_lists.get_list(my_list_id)
    require_my_list_readable(my_list)
    return {**my_list.to_json(), "resourceIds": my_lists.resource_ids(my_list)}


@bp.post("")
@expects("mylist-create")
def create_my_list(body):
    """Create an empty my list owned by the caller."""
    list_id = my_lists.create_list(g.user.user_email, body["name"], body["resourceType"],
                                   body["public"])
    return {"myListId": list_id}, 201


@bp.patch("/<my_list_id>")
@expects("mylist-patch")
def patch_my_list(my_list_id, body):
    """Rename a my list, make it public or private, or replace its editors (owner only)."""
    my_list = my_lists.get_list(my_list_id)
    require_my_list_owner(my_list, "edit")
    my_lists.update_list(my_list, body)
    return "", 204


@bp.delete("/<my_list_id>")
def delete_my_list(my_list_id):
    """Delete a my list and its items (owner only)."""
    my_list = my_lists.get_list(my_list_id)
    require_my_list_owner(my_list, "delete")
    my_lists.delete_list(my_list)
    return "", 204


def _editable(my_list_id):
    my_list = my_lists.get_list(my_list_id)
    require_my_list_editable(my_list)
    return my_list


@bp.patch("/<my_list_id>/items")
@expects("mylist-items-patch")
def patch_my_list_items(my_list_id, body):
    """Add resources to or remove them from a my list (owner and editors)."""
    changed = my_lists.change_items(_editable(my_list_id), body["operation"],
                                    body["resourceIds"])
    return {"changedCount": changed}
