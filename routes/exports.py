"""Volume exports as tasks: /api/series/export-cs-volume, /api/cases/export-mhd."""
from flask import Blueprint, g

import audit
import exports
from auth import require_global
from validation import expects

bp = Blueprint("exports", __name__, url_prefix="/api")
# Each export is audited before its task is queued, so both commit together; the download
# of its file is audited again (routes/tasks.py).


def _may_download(**_kwargs):
    require_global("downloadVolume")


@bp.post("/series/export-cs-volume")
@expects("export-cs-volume", before=_may_download)
def export_cs_volume(body):
    """Export series volumes in the plug-in input format (a task with a download)."""
    audit.record("export", "series", None,
                 detail={"seriesUids": [item["seriesUid"] for item in body["series"]]})
    return {"taskId": exports.start_cs_volume_export(g.user.user_email, g.privileges, body)}, 201


@bp.post("/cases/export-mhd")
@expects("export-mhd", before=_may_download)
def export_mhd(body):
    """Export cases as MHD/RAW volumes and labels (a task with a download)."""
    audit.record("export", "case", None, detail={"caseIds": body["caseIds"]})
    return {"taskId": exports.start_mhd_export(g.user.user_email, g.privileges, body)}, 201
