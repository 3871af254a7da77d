"""The DICOM nodes table: which calling AE titles the listener admits, from where, into
which domain and for which services (``/api/admin/dicom-nodes``, ``dicom-node-*`` CLI).

Bodies arrive validated against schemas/dicom-node*.yaml; the rules here are the ones a
schema cannot express (a known domain, an unchanged AE title). Each change is one
transaction.
"""
from errors import ApiError
from models import DicomNode, ServerParam, db

SERVICES = ("echo", "store", "find", "get", "move")
PRIMARY_KEY_MODIFIED = "The primary key cannot be modified."


class DuplicateNode(ApiError):
    """Raised when a node with the AE title already exists."""

    def __init__(self, ae_title):
        super().__init__(409, f'A DICOM node with the AE title "{ae_title}" already exists.')


def known_domains():
    """The domains of the server parameter ``domains``."""
    param = db.session.get(ServerParam, "domains")
    return list(param.value or []) if param is not None else []


def _check_domain(domain):
    if domain not in known_domains():
        raise ApiError(400, f'The domain "{domain}" does not exist.')


def list_nodes():
    """Every node, by AE title."""
    return db.session.execute(db.select(DicomNode).order_by(DicomNode.ae_title)).scalars().all()


def get_node(ae_title):
    """The node with that AE title; 404 if none."""
    node = db.session.get(DicomNode, ae_title)
    if node is None:
        raise ApiError(404, "The requested DICOM node was not found.")
    return node


def create_node(body):
    """Insert a node (already schema-valid); return it."""
    _check_domain(body["domain"])
    if db.session.get(DicomNode, body["aeTitle"]) is not None:
        raise DuplicateNode(body["aeTitle"])
    node = DicomNode(ae_title=body["aeTitle"], host=body.get("host") or "",
                     port=body.get("port"), domain=body["domain"],
                     allow=[s for s in SERVICES if s in body["allow"]])
    db.session.add(node)
    db.session.commit()
    return node


def update_node(ae_title, body):
    """Apply a partial node (already schema-valid)."""
    if "aeTitle" in body and body["aeTitle"] != ae_title:
        raise ApiError(400, PRIMARY_KEY_MODIFIED)
    node = get_node(ae_title)
    if "domain" in body:
        _check_domain(body["domain"])
        node.domain = body["domain"]
    if "host" in body:
        node.host = body["host"]
    if "port" in body:
        node.port = body["port"]
    if "allow" in body:
        node.allow = [s for s in SERVICES if s in body["allow"]]
    db.session.commit()
    return node


def delete_node(ae_title):
    """Remove a node; 404 if none."""
    db.session.delete(get_node(ae_title))
    db.session.commit()
