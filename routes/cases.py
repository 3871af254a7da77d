"""Clinical cases: /api/cases (cases, revisions, tags, the MHD export)."""
from flask import Blueprint, g, request

import cases
import exports
import my_lists
import search
from auth import can_view_personal_info, require_case_role, require_global
from validation import expects

bp = Blueprint("cases", __name__, url_prefix="/api/cases")


@bp.get("")
def list_cases():
    """Search the cases of the projects the caller can read."""
    key = cases.search_key(g.privileges, can_view_personal_info())
    return search.run(cases.search_spec(g.privileges),
                      lambda: cases.readable_cases_of(key), memo=("cases", key))


@bp.get("/list/<my_list_id>")
def list_cases_in_my_list(my_list_id):
    """Search the cases of a my list (the caller's own or a public one)."""
    my_list = my_lists.list_for_search(my_list_id, "clinicalCases")
    query = cases.in_list(cases.readable_cases(g.privileges, can_view_personal_info()),
                          my_list.my_list_id)
    return search.run(cases.search_spec(g.privileges, in_my_list=True), query)


@bp.post("")
@expects("case-create")
def create_case(body):
    """Create a case (with its first revision) from series of one domain."""
    case_id = cases.create_case(g.user.user_email, g.privileges, body["projectId"],
                                body["series"], body["tags"])
    return {"caseId": case_id}, 201


@bp.get("/<case_id>")
def get_case(case_id):
    """A case with every revision; the ETag names its latest revision."""
    case = cases.get_case(case_id)
    require_case_role(case, "read")
    response = cases.case_document(case)
    return response, 200, {"ETag": f'"{cases.etag(case)}"'}


def _writable(case_id):
    require_case_role(cases.get_case(case_id), "write")


@bp.post("/<case_id>/revision")
@expects("revision", before=_writable)
def post_revision(case_id, body):
    """Append a revision (If-Match: refused with 412 unless it names the latest one)."""
    if_match = request.if_match if "If-Match" in request.headers else None
    tag = cases.append_revision(case_id, g.user.user_email, body, if_match)
    return "", 201, {"ETag": f'"{tag}"'}


@bp.put("/<case_id>/tags")
@expects("case-tags", before=_writable)
def put_tags(case_id, body):
    """Replace the tags of a case."""
    cases.put_tags(cases.get_case(case_id), body)
    return "", 204


@bp.patch("/tags")
@expects("case-tags-patch")
def patch_tags(body):
    """Add, remove or set tags on many cases (write role on each)."""
    cases.bulk_tags(g.privileges, body["operation"], body["tags"], body["caseIds"])
    return "", 204


@bp.delete("/<case_id>")
def delete_case(case_id):
    """Delete a case (moderate role); force=1 removes it from every my list first."""
    case = cases.get_case(case_id)
    require_case_role(case, "moderate")
    cases.delete_case(case, force=request.args.get("force") == "1")
    return "", 204


def _may_download(**_kwargs):
    require_global("downloadVolume")


@bp.post("/export-mhd")
@expects("export-mhd", before=_may_download)
def export_mhd(body):
    """Export cases as MHD/RAW volumes and labels (a task with a download)."""
    return {"taskId": exports.start_mhd_export(g.user.user_email, g.privileges, body)}, 201
