"""/api/series (uploads, task and single; search, get, orientation, delete) and the series
module behind it (partial volume descriptors, look-up, orientation)."""
import io
import json
import os
import shutil
import zipfile

import pytest
import sqlalchemy as sa

import storage
import worker
from dicom.batch import EarlySync, ImportBatch
from errors import ApiError
from models import (CaseSeries, ClinicalCase, PluginJob, PluginJobSeries, Series, ServerParam,
                    Task, db)
from series import (OrientationError, auto_pvd, check_pvd_range, get_series, orientation,
                    pvd_images, resolve_pvd, validate_pvd)
from tests.dicom_factory import dicom_bytes, write_dicom
from tests.factories import make_group, make_series, make_token, make_user

HEAD_FIRST = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.547"
FOOT_FIRST = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.548"


@pytest.fixture
def other_domain(app, tokens):
    """Domain "other" exists; carol sees only it and has no personalInfoView."""
    with app.app_context():
        db.session.get(ServerParam, "domains").value = ["default", "other"]
        group = make_group("others", domains=["other"])
        make_user("carol@example.com", "carol", groups=[group.group_id])
        db.session.commit()
        return {"Authorization": f"Bearer {make_token('carol@example.com')}"}


@pytest.fixture
def imported(app, dicom_dir):
    """The shared head-first and foot-first series, imported into "default"."""
    with app.app_context():
        for folder in ("head-first", "foot-first"):
            with ImportBatch("default") as batch:
                for path in sorted((dicom_dir / folder).glob("*.dcm")):
                    batch.add_file(str(path))
                batch.commit()
    return {"head": HEAD_FIRST, "foot": FOOT_FIRST}


def upload(client, headers, domain, files, single=False):
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    url = f"/api/series/domain/{domain}" + ("/single" if single else "")
    return client.post(url, data=data, headers=headers, content_type="multipart/form-data")


def run_task(app, task_id):
    with app.app_context():
        worker.run_pending()
        task = db.session.get(Task, task_id)
        return task.status, task.finished_message, task.error_message


def leftovers(app):
    """Files left under dicom/ and spool/, and series rows."""
    found = []
    for root in ("dicom", "spool"):
        for folder, _dirs, names in os.walk(os.path.join(app.config["CIRCUS_DATA_DIR"], root)):
            found.extend(os.path.join(folder, n) for n in names)
    with app.app_context():
        rows = db.session.execute(sa.select(sa.func.count()).select_from(Series)).scalar_one()
    return found, rows


def zip_bytes(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def head_first_files(dicom_dir):
    return [(p.name, p.read_bytes()) for p in sorted((dicom_dir / "head-first").glob("*.dcm"))]


# --- upload through a task ---------------------------------------------------------------

def test_upload_files_creates_a_task_that_imports(app, client, auth_headers, dicom_dir):
    res = upload(client, auth_headers["bob"], "default", head_first_files(dicom_dir))
    assert res.status_code == 201 and set(res.json) == {"taskId"}
    task_id = res.json["taskId"]
    with app.app_context():
        task = db.session.get(Task, task_id)
        assert (task.name, task.kind, task.user_email) == ("Series import", "series_import",
                                                           "bob@example.com")
    assert run_task(app, task_id) == ("finished", "Imported 10 entities from 10 files.", None)
    res = client.get(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"])
    assert res.status_code == 200 and res.json["images"] == "1-10"
    assert not os.path.exists(os.path.join(app.config["CIRCUS_DATA_DIR"], "spool", task_id))


def test_upload_zip_with_folders_and_junk(app, client, auth_headers, dicom_dir):
    entries = [(f"a/b/{name}", data) for name, data in head_first_files(dicom_dir)[:4]]
    entries += [("a/readme.txt", b"not dicom"), ("../../etc/x.dcm", dicom_bytes())]
    res = upload(client, auth_headers["alice"], "default",
                 [("study.zip", zip_bytes(entries)), ("notes.txt", b"hello")])
    status, message, _error = run_task(app, res.json["taskId"])
    assert status == "finished"
    assert message == "Imported 4 entities from 2 files. 3 non-DICOM entries were skipped."
    with app.app_context():
        assert db.session.get(Series, HEAD_FIRST).images == "1-4"
        assert db.session.get(Series, "1.2.3.4.5") is None


def test_upload_zip_bomb_fails_the_task_and_leaves_nothing(app, client, auth_headers):
    app.config["ARCHIVE_MAX_TOTAL_BYTES"] = 1024 * 1024
    bomb = zip_bytes([("1.dcm", dicom_bytes()), ("pad.bin", b"\0" * (8 * 1024 * 1024))])
    res = upload(client, auth_headers["alice"], "default", [("bomb.zip", bomb)])
    status, _message, error = run_task(app, res.json["taskId"])
    assert status == "error"
    assert error.startswith("Error while processing file #1, entity #1: The archive is larger")
    assert leftovers(app) == ([], 0)


def test_upload_broken_file_reports_file_and_entity(app, client, auth_headers, dicom_dir):
    files = head_first_files(dicom_dir)[:2] + [("broken.dcm", dicom_bytes()[:400])]
    res = upload(client, auth_headers["alice"], "default", files)
    status, _message, error = run_task(app, res.json["taskId"])
    assert status == "error"
    assert error.startswith("Error while processing file #3, entity #3: ")
    with app.app_context():
        assert db.session.get(Series, HEAD_FIRST).images == "1-2"  # CIRCUS keeps what came before


def test_upload_not_a_zip_is_skipped(app, client, auth_headers):
    res = upload(client, auth_headers["alice"], "default", [("x.zip", b"no zip here" * 20)])
    assert run_task(app, res.json["taskId"])[:2] == (
        "finished", "Imported 0 entities from 1 files. 1 non-DICOM entries were skipped.")


def test_upload_to_a_domain_the_caller_lacks(app, client, auth_headers, other_domain):
    res = upload(client, auth_headers["alice"], "other", [("1.dcm", dicom_bytes())])
    assert res.status_code == 403 and res.json == {"error": "You cannot upload to this domain."}
    res = upload(client, auth_headers["guest"], "default", [("1.dcm", dicom_bytes())], single=True)
    assert res.status_code == 403
    assert leftovers(app) == ([], 0)


def test_upload_to_a_domain_that_does_not_exist(app, client, auth_headers):
    for single in (False, True):
        res = upload(client, auth_headers["alice"], "nowhere", [("1.dcm", dicom_bytes())], single)
        assert res.status_code == 400 and res.json["error"] == 'The domain "nowhere" does not exist.'
    assert leftovers(app) == ([], 0)


def test_upload_without_files(app, client, auth_headers):
    headers = auth_headers["alice"]
    res = client.post("/api/series/domain/default", data=b"--xyz--\r\n", headers=headers,
                      content_type="multipart/form-data; boundary=xyz")
    assert res.status_code == 400 and res.json["error"] == "No file was uploaded."
    res = client.post("/api/series/domain/default", data=b"", headers=headers,
                      content_type="multipart/form-data")
    assert res.status_code == 400
    res = client.post("/api/series/domain/default", data={"other": (io.BytesIO(b"x"), "a")},
                      headers=headers, content_type="multipart/form-data")
    assert res.status_code == 400 and "field name" in res.json["error"]
    res = client.post("/api/series/domain/default", json={}, headers=headers)
    assert res.status_code == 415
    assert leftovers(app) == ([], 0)
    with app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(Task)).scalar_one() == 0


def test_upload_file_over_the_limit(app, client, auth_headers):
    app.config["UPLOAD_FILE_SIZE_MAX_BYTES"] = 1000
    res = upload(client, auth_headers["alice"], "default", [("1.dcm", dicom_bytes(rows=64, columns=64))])
    assert res.status_code == 413 and res.json == {"error": "request entity too large"}
    assert leftovers(app) == ([], 0)


def test_upload_needs_a_token(client):
    assert upload(client, {}, "default", [("1.dcm", dicom_bytes())]).status_code == 401


# --- single -------------------------------------------------------------------------------

def test_single_imports_synchronously(app, client, auth_headers, dicom_dir):
    data = (dicom_dir / "misc" / "CT-phantom-lossless.dcm").read_bytes()
    res = upload(client, auth_headers["bob"], "default", [("ct.dcm", data)], single=True)
    assert res.status_code == 201 and res.data == b""
    uid = "1.2.840.113619.2.55.1.1762528103.1926.1149118792.373"
    assert client.get(f"/api/series/{uid}", headers=auth_headers["bob"]).json["images"] == "73"
    with open(storage_path(app, uid, 73), "rb") as fh:
        assert fh.read() == data
    res = upload(client, auth_headers["bob"], "default", [("ct.dcm", data)], single=True)
    assert res.status_code == 201  # idempotent


def storage_path(app, uid, number):
    with app.app_context():
        return storage.instance_path(uid, number)


@pytest.mark.parametrize("files, message", [
    ([("a.zip", zip_bytes([("1.dcm", b"x")]))],
     "The file is not a DICOM file. You cannot use archived files."),
    ([("a.txt", b"hello")], "The file is not a DICOM file. You cannot use archived files."),
    ([("1.dcm", b"x"), ("2.dcm", b"y")], "Only one file is allowed."),
])
def test_single_refusals(app, client, auth_headers, files, message):
    res = upload(client, auth_headers["alice"], "default", files, single=True)
    assert res.status_code == 400 and res.json == {"error": message}
    assert leftovers(app) == ([], 0)


@pytest.mark.parametrize("content, detail", [
    (dicom_bytes()[:500], "truncated"),
    (dicom_bytes(SeriesInstanceUID=None), "Series UID of this DICOM file is invalid."),
    (dicom_bytes(InstanceNumber=None), "Instance number not set"),
])
def test_single_broken_file_is_a_clear_400(app, client, auth_headers, content, detail):
    res = upload(client, auth_headers["alice"], "default", [("x.dcm", content)], single=True)
    assert res.status_code == 400
    assert res.json["error"].startswith("Error while importing a DICOM file. This may mean the "
                                        "uploaded file is broken.")
    assert detail in res.json["error"]
    assert leftovers(app) == ([], 0)


def test_single_into_another_domain_of_an_existing_series(app, client, auth_headers, other_domain):
    assert upload(client, auth_headers["alice"], "default", [("1.dcm", dicom_bytes())],
                  single=True).status_code == 201
    before = leftovers(app)
    res = upload(client, other_domain, "other", [("2.dcm", dicom_bytes(instance=2))], single=True)
    assert res.status_code == 409 and "already exists in another domain" in res.json["error"]
    assert leftovers(app) == before
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1"


def test_single_closes_the_early_sync_of_every_outcome(app, client, auth_headers, other_domain):
    """/single starts the fsync of its file at once (dicom.batch.EarlySync): whatever the
    outcome (new, replaced, broken, refused for its domain), that file is closed again."""
    def open_files():
        return len(os.listdir("/proc/self/fd"))
    headers = auth_headers["alice"]
    first = dicom_bytes()
    assert upload(client, headers, "default", [("1.dcm", first)], single=True).status_code == 201
    before = open_files()
    for _ in range(3):
        latest = dicom_bytes()
        assert upload(client, headers, "default", [("1.dcm", latest)],
                      single=True).status_code == 201  # replaces the stored instance
        assert upload(client, headers, "default", [("2.dcm", dicom_bytes(instance=2))],
                      single=True).status_code == 201
        assert upload(client, headers, "default", [("x.dcm", dicom_bytes()[:500])],
                      single=True).status_code == 400
        assert upload(client, other_domain, "other", [("3.dcm", dicom_bytes(instance=3))],
                      single=True).status_code == 409
    assert open_files() == before
    with open(storage_path(app, "1.2.3.4.5", 1), "rb") as fh:
        assert fh.read() == latest
    with app.app_context():
        assert os.listdir(storage.dicom_staging_dir("batches")) == []
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1-2"


# --- search -------------------------------------------------------------------------------

@pytest.fixture
def searchable(app, tokens, other_domain):
    with app.app_context():
        make_series("1.2.9.1", modality="CT", series_date=parse("2020-01-05"),
                    patient_info={"patientId": "A1", "patientName": "Anzu Sato", "age": 30, "sex": "F"})
        make_series("1.2.9.2", modality="MR", series_date=parse("2021-06-01"),
                    patient_info={"patientId": "B2", "patientName": "Koume", "age": 70, "sex": "M"})
        make_series("1.2.9.3", modality="CT", series_date=parse("2022-02-02"),
                    patient_info={"patientId": "C3", "patientName": "Mika", "age": 55, "sex": "F"})
        make_series("1.2.9.9", domain="other", modality="CT")
        db.session.commit()


def parse(text):
    from models import parse_iso
    return parse_iso(text + "T00:00:00Z")


def search(client, headers, **params):
    query = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()}
    return client.get("/api/series", query_string=query, headers=headers)


def uids(res):
    return [item["seriesUid"] for item in res.json["items"]]


def test_search_returns_only_the_callers_domains(client, auth_headers, other_domain, searchable):
    res = search(client, auth_headers["alice"], sort={"seriesUid": 1})
    assert res.status_code == 200 and uids(res) == ["1.2.9.1", "1.2.9.2", "1.2.9.3"]
    assert res.json["totalItems"] == 3 and res.json["page"] == 1
    assert uids(search(client, other_domain)) == ["1.2.9.9"]
    assert search(client, auth_headers["guest"]).json == {"items": [], "totalItems": 0, "page": 1}


def test_search_masks_patient_info(app, client, auth_headers, other_domain, searchable):
    item = search(client, auth_headers["alice"]).json["items"][0]
    assert set(item["patientInfo"]) == {"patientId", "patientName", "age", "sex"}
    assert "patientInfo" not in search(client, other_domain).json["items"][0]
    with app.app_context():
        from models import User
        db.session.get(User, "alice@example.com").preferences = {"personalInfoView": False}
        db.session.commit()
    assert "patientInfo" not in search(client, auth_headers["alice"]).json["items"][0]


@pytest.mark.parametrize("flt, expected", [
    ({"modality": "CT"}, ["1.2.9.1", "1.2.9.3"]),
    ({"$and": [{"modality": "CT"}, {"seriesDate": {"$gte": {"$date": "2021-01-01T00:00:00Z"}}}]},
     ["1.2.9.3"]),
    ({"patientInfo.patientName": {"$regex": "anzu", "$options": "i"}}, ["1.2.9.1"]),
    ({"patientInfo.age": {"$gte": 50, "$lt": 70}}, ["1.2.9.3"]),
    ({"$or": [{"patientInfo.sex": "M"}, {"seriesUid": "1.2.9.1"}]}, ["1.2.9.1", "1.2.9.2"]),
    ({"studyUid": "1.2.9.2.0"}, ["1.2.9.2"]),
    ({"seriesUid": {"$in": ["1.2.9.3", "1.2.9.9"]}}, ["1.2.9.3"]),
])
def test_search_filters(client, auth_headers, searchable, flt, expected):
    res = search(client, auth_headers["bob"], filter=flt, sort={"seriesUid": 1})
    assert res.status_code == 200 and uids(res) == expected


def test_search_sort_and_paging(client, auth_headers, searchable):
    res = search(client, auth_headers["bob"], sort={"seriesDate": -1}, limit=2, page=1)
    assert uids(res) == ["1.2.9.3", "1.2.9.2"] and res.json["totalItems"] == 3
    res = search(client, auth_headers["bob"], sort={"seriesDate": -1}, limit=2, page=2)
    assert uids(res) == ["1.2.9.1"]


def test_search_with_patient_filter_needs_the_privilege(client, other_domain, searchable):
    res = search(client, other_domain, filter={"patientInfo.patientId": "A1"})
    assert res.status_code == 400
    assert res.json == {"error": "You cannot search using patient information."}


def test_repeated_searches_follow_each_callers_privileges(app, client, auth_headers, searchable):
    """The statements of a search are reused between requests (search.py memo), but never
    across callers whose domains or personalInfoView differ, nor after a group change."""
    with app.app_context():
        group = make_group("readers", domains=["default"])
        make_user("dave@example.com", "dave", groups=[group.group_id])
        db.session.commit()
        group_id = group.group_id
        dave = {"Authorization": f"Bearer {make_token('dave@example.com')}"}
    flt = {"patientInfo.patientId": "A1"}
    assert uids(search(client, auth_headers["bob"], filter=flt)) == ["1.2.9.1"]
    res = search(client, dave, filter=flt)
    assert res.status_code == 400
    assert res.json == {"error": "You cannot search using patient information."}
    assert search(client, dave).json["totalItems"] == 3
    res = client.patch(f"/api/admin/groups/{group_id}", json={"domains": ["other"]},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert uids(search(client, dave)) == ["1.2.9.9"]


@pytest.mark.parametrize("flt", [{"domain": "other"}, {"parameters.KVP": 120}, {"modality": None}])
def test_search_bad_filters(client, auth_headers, searchable, flt):
    res = search(client, auth_headers["alice"], filter=flt)
    assert res.status_code == 400 and res.json == {"error": "Bad filter."}


# --- one series -------------------------------------------------------------------------

def test_get_series(app, client, auth_headers, other_domain, imported):
    res = client.get(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"])
    assert res.status_code == 200
    body = res.json
    assert body["seriesUid"] == HEAD_FIRST and body["domain"] == "default"
    assert body["patientInfo"]["patientName"] == "TEST^MR1"
    assert body["seriesDate"] == "2018-02-16T09:36:47.829Z"
    assert body["createdAt"].endswith("Z") and body["storageId"] == 0
    res = client.get(f"/api/series/{HEAD_FIRST}", headers=other_domain)
    assert res.status_code == 403
    assert res.json == {"error": "You do not have privilege to access this series."}
    res = client.get("/api/series/1.2.3.999", headers=auth_headers["bob"])
    assert res.status_code == 404 and res.json == {"error": "The requested series was not found."}


@pytest.mark.parametrize("series, query, expected", [
    ("head", "", "head-first"), ("foot", "", "foot-first"),
    ("head", "?start=2&end=5", "head-first"), ("foot", "?start=3&end=3", "head-first"),
    ("foot", "?start=9&end=2", "foot-first"),  # quirk 32: no inversion for start > end
])
def test_orientation(client, auth_headers, imported, series, query, expected):
    res = client.get(f"/api/series/{imported[series]}/orientation{query}",
                     headers=auth_headers["bob"])
    assert res.status_code == 200 and res.json == {"orientation": expected}


@pytest.mark.parametrize("query, status, message", [
    ("?start=0", 400, "Invalid string"), ("?end=abc", 400, "Invalid string"),
    ("?start=01", 400, "Invalid string"),
    ("?start=11", 400, "The given start/end number is out of bounds."),
    ("?start=1&end=12", 400, "The given start/end number is out of bounds."),
])
def test_orientation_query_errors(client, auth_headers, imported, query, status, message):
    res = client.get(f"/api/series/{HEAD_FIRST}/orientation{query}", headers=auth_headers["bob"])
    assert res.status_code == status and res.json == {"error": message}


def test_orientation_privileges_and_missing_files(app, client, auth_headers, other_domain, imported):
    res = client.get(f"/api/series/{HEAD_FIRST}/orientation", headers=other_domain)
    assert res.status_code == 403
    res = client.get("/api/series/1.2.3.998/orientation", headers=auth_headers["bob"])
    assert res.status_code == 404
    with app.app_context():
        make_series("1.2.3.997", images="1-3")
        db.session.commit()
    res = client.get("/api/series/1.2.3.997/orientation", headers=auth_headers["bob"])
    assert res.status_code == 500 and res.json == {"error": "no image"}


# --- delete -------------------------------------------------------------------------------

def test_delete_series_removes_row_and_files(app, client, auth_headers, imported):
    folder = os.path.dirname(storage_path(app, HEAD_FIRST, 1))
    assert os.path.isdir(folder)
    res = client.delete(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"])
    assert res.status_code == 204 and res.data == b""
    assert not os.path.exists(folder)
    assert client.get(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"]).status_code == 404
    files, rows = leftovers(app)
    assert rows == 1 and all(FOOT_FIRST in f for f in files)
    # the series can be imported again afterwards
    assert upload(client, auth_headers["bob"], "default", head_first_files(app_dicom())[:1],
                  single=True).status_code == 201


def app_dicom():
    from tests.conftest import DICOM_DIR
    return DICOM_DIR


def test_delete_needs_the_domain(client, auth_headers, other_domain, imported):
    res = client.delete(f"/api/series/{HEAD_FIRST}", headers=other_domain)
    assert res.status_code == 403
    assert client.delete(f"/api/series/{HEAD_FIRST}", headers=auth_headers["guest"]).status_code == 403
    assert client.delete("/api/series/1.2.3.996", headers=auth_headers["bob"]).status_code == 404
    assert client.get(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"]).status_code == 200


def test_delete_refused_while_a_job_or_case_uses_it(app, client, auth_headers, default_project,
                                                    imported):
    with app.app_context():
        db.session.add(PluginJob(job_id="job1", plugin_id="p", user_email="bob@example.com",
                                 series=[{"seriesUid": HEAD_FIRST}]))
        db.session.flush()
        db.session.add(PluginJobSeries(job_id="job1", position=0, series_uid=HEAD_FIRST))
        db.session.add(ClinicalCase(case_id="case1", project_id=default_project,
                                    latest_revision={}, tags=[], domains=["default"]))
        db.session.flush()
        db.session.add(CaseSeries(case_id="case1", series_uid=FOOT_FIRST))
        db.session.commit()
    res = client.delete(f"/api/series/{HEAD_FIRST}", headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.json == {"error": "There is a plug-in job associated with this series."}
    res = client.delete(f"/api/series/{FOOT_FIRST}", headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.json == {"error": "There is a case associated with this series."}
    assert os.path.exists(storage_path(app, HEAD_FIRST, 1))
    assert os.path.exists(storage_path(app, FOOT_FIRST, 1))
    assert leftovers(app)[1] == 2


def test_early_sync_works_in_a_forked_child(tmp_path):
    """EarlySync's thread pool does not survive a fork: a child (a job process, say) that
    syncs a file gets a pool of its own instead of waiting forever on its parent's."""
    path = tmp_path / "f"
    path.write_bytes(b"x")
    EarlySync(str(path)).wait()  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its sync completes
        code = 1
        try:
            early = EarlySync(str(path))
            early.future.result(timeout=10)
            early.wait()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# --- the series module: partial volume descriptors -------------------------------------

@pytest.mark.parametrize("pvd, images", [
    ({"start": 1, "end": 3, "delta": 1}, [1, 2, 3]),
    ({"start": 10, "end": 8, "delta": -1}, [10, 9, 8]),
    ({"start": 25, "end": 85, "delta": 3}, list(range(25, 86, 3))),
    ({"start": 4, "end": 4, "delta": 1}, [4]),
    ({"start": 4, "end": 4, "delta": 2}, [4]),
])
def test_pvd_images(pvd, images):
    assert pvd_images(pvd) == images


@pytest.mark.parametrize("pvd", [
    {"start": 0, "end": 3, "delta": 1}, {"start": 1, "end": 0, "delta": -1},
    {"start": 1, "end": 3, "delta": 0}, {"start": 3, "end": 1, "delta": 1},
    {"start": 1, "end": 3, "delta": -1}, {"start": 1, "end": 4, "delta": 2},
    {"start": 2, "end": 2, "delta": -1}, {"start": 1, "end": 3}, {"start": 1.5, "end": 3, "delta": 1},
    {"start": True, "end": 3, "delta": 1}, {"start": 1, "end": 3, "delta": 1, "x": 1},
    "auto", None, [1, 2, 1],
])
def test_validate_pvd_rejects(pvd):
    with pytest.raises(ApiError) as info:
        validate_pvd(pvd)
    assert info.value.status == 400
    assert info.value.message.startswith("Invalid partial volume descriptor: ")


def test_validate_pvd_message_quotes_compact_json():
    with pytest.raises(ApiError) as info:
        validate_pvd({"start": 3, "end": 1, "delta": 1})
    assert info.value.message == 'Invalid partial volume descriptor: {"start":3,"end":1,"delta":1}'


def test_check_pvd_range(app):
    with app.app_context():
        series = make_series("1.2.3.9", images="1-5,8")
        check_pvd_range(series, {"start": 5, "end": 1, "delta": -1})
        check_pvd_range(series, {"start": 2, "end": 8, "delta": 3})
        for pvd in ({"start": 1, "end": 6, "delta": 1}, {"start": 8, "end": 9, "delta": 1}):
            with pytest.raises(ApiError) as info:
                check_pvd_range(series, pvd)
            assert (info.value.status, info.value.message) == (400, "Specified range is invalid.")


# --- the series module: look-up and orientation ---------------------------------------

def test_get_series_finds_the_row_or_404(app):
    with app.app_context():
        make_series("1.2.3.10")
        assert get_series("1.2.3.10").series_uid == "1.2.3.10"
        with pytest.raises(ApiError) as info:
            get_series("1.2.3.11")
        assert (info.value.status, info.value.message) == (404, "The requested series was not found.")


def _store_shared(folder, series_uid, count=10):
    """Copy the shared sample series into storage as instances 1..count."""
    for n in range(1, count + 1):
        path = storage.instance_path(series_uid, n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(folder / f"{folder.name}{n:03d}.dcm", path)


@pytest.mark.parametrize("folder, expected, delta", [("head-first", "head-first", 1),
                                                     ("foot-first", "foot-first", -1)])
def test_orientation_and_auto_of_shared_samples(app, dicom_dir, folder, expected, delta):
    with app.app_context():
        uid = "1.2.3.20"
        _store_shared(dicom_dir / folder, uid)
        series = make_series(uid, images="1-10")
        assert orientation(series) == expected
        # quirk 32 fixed: start > end answers for the ascending order, not the inverse
        assert orientation(series, 10, 1) == expected
        assert orientation(series, 3, 7) == expected
        pvd = auto_pvd(series)
        assert pvd == ({"start": 1, "end": 10, "delta": 1} if delta == 1
                       else {"start": 10, "end": 1, "delta": -1})
        db.session.commit()
        assert resolve_pvd(uid, "auto") == pvd


def test_orientation_uses_first_contiguous_run_for_auto(app, dicom_dir):
    with app.app_context():
        uid = "1.2.3.21"
        _store_shared(dicom_dir / "foot-first", uid, count=4)
        series = make_series(uid, images="1-3,7")  # 7 has no file: auto never reads it
        assert auto_pvd(series) == {"start": 3, "end": 1, "delta": -1}


def test_orientation_zero_position_is_a_real_value(app):
    """Quirk 32: z = 0 was treated as missing (500); it is an ordinary position."""
    with app.app_context():
        uid = "1.2.3.22"
        for n, z in ((1, 0.0), (2, -5.0)):
            path = storage.instance_path(uid, n)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_dicom(path, series_uid=uid, instance=n, z=z)
        series = make_series(uid, images="1-2")
        assert orientation(series) == "head-first"
        write_dicom(storage.instance_path(uid, 1), series_uid=uid, instance=1, z=-10.0)
        assert orientation(series) == "foot-first"


def test_orientation_errors(app):
    with app.app_context():
        uid = "1.2.3.23"
        series = make_series(uid, images="1-2")
        with pytest.raises(OrientationError) as info:
            orientation(series)
        assert (info.value.status, info.value.message) == (500, "no image")
        for n in (1, 2):
            path = storage.instance_path(uid, n)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_dicom(path, series_uid=uid, instance=n, ImagePositionPatient=None)
        with pytest.raises(OrientationError) as info:
            orientation(series)
        assert info.value.message == "invalid image"
        db.session.commit()
        with pytest.raises(ApiError) as info:
            resolve_pvd(uid, "auto")
        assert (info.value.status, info.value.message) == (500, "Internal server error.")


def test_single_image_is_head_first_without_files(app):
    with app.app_context():
        assert orientation(make_series("1.2.3.24", images="1")) == "head-first"


def test_resolve_pvd(app):
    with app.app_context():
        pvd = {"start": 1, "end": 2, "delta": 1}
        assert resolve_pvd("1.2.3.25", pvd) is pvd
        with pytest.raises(ApiError) as info:
            resolve_pvd("1.2.3.25", "auto")
        assert info.value.status == 404
