"""/api/admin: one parent blueprint whose single guard (auth.require_admin) covers every
child, so a new admin route cannot be left open by forgetting its own check."""
from flask import Blueprint

import audit as audit_trail
from auth import require_admin
from routes.admin import (audit, dicom_nodes, groups, onetime_urls, plugin_job_manager, plugins,
                          projects, server_params, users)

bp = Blueprint("admin", __name__, url_prefix="/api/admin")
bp.before_request(require_admin)
bp.before_request(audit_trail.admin_change)  # after the guard: every admin change is recorded
for child in (groups, users, projects, plugins, server_params, onetime_urls, plugin_job_manager,
              audit, dicom_nodes):
    bp.register_blueprint(child.bp)
