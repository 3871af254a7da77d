"""DICOM nodes the listener admits: /api/admin/dicom-nodes."""
from flask import Blueprint

from dicom import nodes
from validation import expects

bp = Blueprint("admin_dicom_nodes", __name__, url_prefix="/dicom-nodes")


@bp.get("")
def list_dicom_nodes():
    """Every DICOM node, by AE title."""
    return [node.to_json() for node in nodes.list_nodes()]


@bp.get("/<ae_title>")
def get_dicom_node(ae_title):
    """One DICOM node."""
    return nodes.get_node(ae_title).to_json()


@bp.post("")
@expects("dicom-node-create")
def create_dicom_node(body):
    """Register a DICOM node (AE title, host, port, domain, allowed services)."""
    return nodes.create_node(body).to_json(), 201


@bp.patch("/<ae_title>")
@expects("dicom-node")
def patch_dicom_node(ae_title, body):
    """Update some fields of a DICOM node."""
    nodes.update_node(ae_title, body)
    return "", 204


@bp.delete("/<ae_title>")
def delete_dicom_node(ae_title):
    """Remove a DICOM node."""
    nodes.delete_node(ae_title)
    return "", 204
