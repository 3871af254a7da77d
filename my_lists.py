"""My lists: named, ordered collections of series, cases or plug-in jobs (API 3.14, 4.15).

The header is a ``MyList`` row owned by one user; ``MyListEditor`` mirrors its ``editors``
for look-ups by user or group; items are ``MyListItem`` rows whose ``created_at`` is both
"addedToListAt" and the insertion order.

Access: the owner may do everything; anyone may read the items of a public list; the owner
and the editors (by e-mail or by group) may edit the items.
"""
import logging
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa

from auth import can_read_my_list
from errors import ApiError, not_found
from models import (ClinicalCase, Group, MyList, MyListEditor, MyListItem, PluginJob, Series,
                    User, db, utcnow)

log = logging.getLogger(__name__)

MAX_ITEMS = 1000


@dataclass(frozen=True)
class ResourceKind:
    """What a my list of one resource type holds."""
    key: object  # the primary-key column of the resources
    schema: str  # for "The requested <schema> was not found."
    not_for: str  # "This my list is not for <...>"


RESOURCE_KINDS = {
    "series": ResourceKind(Series.series_uid, "series", "This my list is not for series"),
    "clinicalCases": ResourceKind(ClinicalCase.case_id, "clinicalCase",
                                  "This my list is not for cases"),
    "pluginJobs": ResourceKind(PluginJob.job_id, "pluginJob",
                               "This my list is not for plugin jobs"),
}


class MyListNotFound(ApiError):
    """Raised when no my list has the given ID."""

    def __init__(self):
        super().__init__(404, "This my list does not exist")


# --- reading ----------------------------------------------------------------------------

def get_list(my_list_id):
    """The my list with this ID (of any owner), else MyListNotFound."""
    my_list = db.session.get(MyList, my_list_id)
    if my_list is None:
        raise MyListNotFound()
    return my_list


def own_lists(user_email):
    """The headers of a user's own lists, oldest first."""
    return db.session.execute(db.select(MyList).where(MyList.user_email == user_email)
                              .order_by(MyList.created_at, MyList.my_list_id)).scalars().all()


def shared_lists(user_email, group_ids):
    """Lists of other users on which the user is an editor (by e-mail or by group)."""
    editor = sa.or_(MyListEditor.user_email == user_email,
                    MyListEditor.group_id.in_(list(group_ids or [])))
    ids = db.select(MyListEditor.my_list_id).where(editor)
    return db.session.execute(db.select(MyList).where(MyList.my_list_id.in_(ids),
                                                      MyList.user_email != user_email)
                              .order_by(MyList.created_at, MyList.my_list_id)).scalars().all()


def resource_ids(my_list):
    """The IDs in a list, in insertion order."""
    return list(db.session.execute(
        db.select(MyListItem.resource_id).where(MyListItem.my_list_id == my_list.my_list_id)
        .order_by(MyListItem.created_at, MyListItem.resource_id)).scalars())


def list_for_search(my_list_id, resource_type, user=None):
    """The list a list-scoped search (``/<resource>/list/<id>``) runs in.

    The caller's own lists and public lists are accepted (CIRCUS accepts only the caller's
    own lists: quirk 10's optional improvement). Join ``MyListItem`` on ``my_list_id`` and
    ``resource_id``; "addedToListAt" is ``MyListItem.created_at``.

    Parameters
    ----------
    my_list_id : str
    resource_type : str
        ``series``, ``clinicalCases`` or ``pluginJobs``.
    user : User, optional
        Defaults to the caller (``g.user``).

    Raises
    ------
    ApiError
        404 "This my list does not exist" for an unknown list or one the user may not read,
        400 "This my list is not for ..." for a list of another resource type.
    """
    my_list = db.session.get(MyList, my_list_id)
    if my_list is None or not can_read_my_list(my_list, user):
        raise MyListNotFound()
    if my_list.resource_type != resource_type:
        raise ApiError(400, RESOURCE_KINDS[resource_type].not_for)
    return my_list


# --- writing ----------------------------------------------------------------------------

def create_list(user_email, name, resource_type, public):
    """Create an empty list owned by the user; return its ID."""
    my_list = MyList(user_email=user_email, name=name, resource_type=resource_type,
                     public=public, editors=[], created_at=utcnow())
    db.session.add(my_list)
    db.session.commit()
    return my_list.my_list_id


def _normalised_editors(editors):
    """Editors as stored; integral group IDs become ints. 400 for unknown users/groups."""
    result = []
    for editor in editors:
        if editor["type"] == "group":
            gid = editor["groupId"]
            if isinstance(gid, float) and gid.is_integer():
                gid = int(gid)
            result.append({"type": "group", "groupId": gid})
        else:
            result.append({"type": "user", "userEmail": editor["userEmail"]})
    emails = {e["userEmail"] for e in result if e["type"] == "user"}
    if emails:
        known = set(db.session.execute(
            db.select(User.user_email).where(User.user_email.in_(emails))).scalars())
        if emails - known:
            raise ApiError(400, "Invalid email address is included")
    group_ids = {e["groupId"] for e in result if e["type"] == "group"}
    if group_ids:
        if not all(isinstance(gid, int) for gid in group_ids):
            raise ApiError(400, "Invalid group ID is included")
        known = set(db.session.execute(
            db.select(Group.group_id).where(Group.group_id.in_(group_ids))).scalars())
        if group_ids - known:
            raise ApiError(400, "Invalid group ID is included")
    return result


def update_list(my_list, changes):
    """Apply a PATCH body (name, public, editors) to a list and commit."""
    if "name" in changes:
        my_list.name = changes["name"]
    if "public" in changes:
        my_list.public = changes["public"]
    if "editors" in changes:
        editors = _normalised_editors(changes["editors"])
        my_list.editors = editors
        db.session.execute(sa.delete(MyListEditor).where(
            MyListEditor.my_list_id == my_list.my_list_id))
        db.session.add_all(MyListEditor(
            my_list_id=my_list.my_list_id,
            user_email=e.get("userEmail"), group_id=e.get("groupId")) for e in editors)
    db.session.commit()


def delete_list(my_list):
    """Delete a list with its items and editors."""
    list_id = my_list.my_list_id
    db.session.execute(sa.delete(MyListItem).where(MyListItem.my_list_id == list_id))
    db.session.execute(sa.delete(MyListEditor).where(MyListEditor.my_list_id == list_id))
    db.session.delete(my_list)
    db.session.commit()


def _lock(my_list):
    """Serialise item changes of one list (a row lock on PostgreSQL, the write lock on
    SQLite), so that concurrent additions cannot pass the item cap together."""
    db.session.execute(sa.update(MyList).where(MyList.my_list_id == my_list.my_list_id)
                       .values(name=MyList.name))


def _check_resources_exist(kind, ids):
    """404 "The requested <schema> was not found." for the first unknown ID (one query)."""
    found = set(db.session.execute(db.select(kind.key).where(kind.key.in_(ids))).scalars())
    for resource_id in ids:
        if resource_id not in found:
            raise not_found(kind.schema)


def change_items(my_list, operation, ids):
    """Add or remove items of a list in one transaction; return how many changed.

    Added IDs must exist in the collection of the list's type; IDs already present are
    ignored, as are absent IDs on removal. The list never holds more than MAX_ITEMS.
    """
    ids = list(dict.fromkeys(ids))  # a repeated ID counts once
    kind = RESOURCE_KINDS[my_list.resource_type]
    if operation == "add":
        _check_resources_exist(kind, ids)
    _lock(my_list)
    present = set(db.session.execute(
        db.select(MyListItem.resource_id).where(MyListItem.my_list_id == my_list.my_list_id,
                                                MyListItem.resource_id.in_(ids))).scalars())
    if operation == "add":
        new = [rid for rid in ids if rid not in present]
        count = db.session.execute(db.select(sa.func.count()).where(
            MyListItem.my_list_id == my_list.my_list_id)).scalar_one()
        if count + len(new) > MAX_ITEMS:
            db.session.rollback()
            raise ApiError(400, f"The number of items cannot exceed {MAX_ITEMS}")
        now = utcnow()
        # Distinct microseconds keep the insertion order of one request.
        db.session.add_all(MyListItem(my_list_id=my_list.my_list_id, resource_id=rid,
                                      created_at=now + timedelta(microseconds=i))
                           for i, rid in enumerate(new))
        changed = len(new)
    else:
        gone = [rid for rid in ids if rid in present]
        if gone:
            db.session.execute(sa.delete(MyListItem).where(
                MyListItem.my_list_id == my_list.my_list_id,
                MyListItem.resource_id.in_(gone)))
        changed = len(gone)
    db.session.commit()
    return changed


def remove_resource_everywhere(resource_type, resource_id):
    """Remove one resource from every list of its type (the caller commits)."""
    lists = db.select(MyList.my_list_id).where(MyList.resource_type == resource_type)
    db.session.execute(sa.delete(MyListItem).where(MyListItem.resource_id == resource_id,
                                                   MyListItem.my_list_id.in_(lists)))


def in_any_list(resource_type, resource_id):
    """Whether any list of the resource's type holds it."""
    return db.session.execute(db.select(
        sa.exists().where(MyListItem.resource_id == resource_id,
                          MyListItem.my_list_id == MyList.my_list_id,
                          MyList.resource_type == resource_type))).scalar()
