"""Clinical cases: /api/cases."""
from flask import Blueprint, g, request

import clinical_cases
import my_lists
import search
from auth import can_view_personal_info, require_case_role
from validation import expects

bp = Blueprint("cases", __name__, url_prefix="/api/cases")


@bp.get("")
def list_cases():
    """Search the cases of the projects the caller can read."""
    key = clinical_cases.search_key(g.privileges, can_view_personal_info())
    return search.run(clinical_cases.search_spec(g.privileges),
                      lambda: clinical_cases.readable_cases_of(key), memo=("cases", key))


@bp.get("/list/<my_list_id>")
def list_cases_in_my_list(my_list_id):
    """Search the cases of a my list (the caller's own or a public one)."""
    my_list = my_lists.list_for_search(my_list_id, "clinicalCases")
    query = clinical_cases.in_list(
        clinical_cases.readable_cases(g.privileges, can_view_personal_info()), my_list.my_list_id)
    return search.run(clinical_cases.search_spec(g.privileges, in_my_list=True), query)


@bp.post("")
@expects("case-create")
def create_case(body):
    """Create a case (with its first revision) from series of one domain."""
    case_id = clinical_cases.create_case(g.user.user_email, g.privileges, body["projectId"],
                                         body["series"], body["tags"])
    return {"caseId": case_id}, 201


@bp.get("/<case_id>")
def get_case(case_id):
    """A case with every revision; the ETag names its latest revision."""
    case = clinical_cases.get_case(case_id)
    require_case_role(case, "read")
    response = clinical_cases.case_document(case)
    return response, 200, {"ETag": f'"{clinical_cases.etag(case)}"'}


def _writable(case_id):
    require_case_role(clinical_cases.get_case(case_id), "write")


@bp.post("/<case_id>/revision")
@expects("revision", before=_writable)
def post_revision(case_id, body):
    """Append a revision (If-Match: refused with 412 unless it names the latest one)."""
    if_match = request.if_match if "If-Match" in request.headers else None
    tag = clinical_cases.append_revision(case_id, g.user.user_email, body, if_match)
    return "", 201, {"ETag": f'"{tag}"'}


@bp.put("/<case_id>/tags")
@expects("case-tags", before=_writable)
def put_tags(case_id, body):
    """Replace the tags of a case."""
    clinical_cases.put_tags(clinical_cases.get_case(case_id), body)
    return "", 204


@bp.patch("/tags")
@expects("case-tags-patch")
def patch_tags(body):
    """Add, remove or set tags on many cases (write role on each)."""
    clinical_cases.bulk_tags(g.privileges, body["operation"], body["tags"], body["caseIds"])
    return "", 204


@bp.delete("/<case_id>")
def delete_case(case_id):
    """Delete a case (moderate role); force=1 removes it from every my list first."""
    case = clinical_cases.get_case(case_id)
    require_case_role(case, "moderate")
    clinical_cases.delete_case(case, force=request.args.get("force") == "1")
    return "", 204
