"""The audit trail: /api/admin/audit (manageServer, the parent blueprint's guard)."""
from flask import Blueprint

import audit
import search
from models import AuditEvent, db

bp = Blueprint("admin_audit", __name__, url_prefix="/audit")

AUDIT_FIELDS = {
    "seq": AuditEvent.seq, "at": AuditEvent.at, "userEmail": AuditEvent.user_email,
    "tokenId": AuditEvent.token_id, "client": AuditEvent.client, "action": AuditEvent.action,
    "targetType": AuditEvent.target_type, "targetId": AuditEvent.target_id,
    "outcome": AuditEvent.outcome, "status": AuditEvent.status,
}
AUDIT_SEARCH = search.SearchSpec(fields=AUDIT_FIELDS, serialize=audit.to_json,
                                 default_sort={"seq": -1})


@bp.get("")
def list_audit_events():
    """Search the audit trail (filter on action, userEmail, targetId, at, outcome...)."""
    return search.run(AUDIT_SEARCH, lambda: db.select(AuditEvent), memo="admin/audit",
                      patient_info_allowed=False)
