"""Plug-in jobs: registration, reading, PATCH, search and attachments (/api/plugin-jobs)."""
import json
import os
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from flask import g

import auth
import storage
from models import MyList, MyListItem, PluginJob, Series, User, db
from plugins import jobs
from tests.factories import make_plugin
from tests.plugin_helpers import grant, store_sample_series

AUTO = "auto"


@pytest.fixture
def env(app, tokens, dicom_dir):
    """A CAD plug-in bob may run (with viewPersonalInfo) and the head-first MR series."""
    with app.app_context():
        pid = make_plugin().plugin_id
        db.session.commit()
        grant("bob@example.com", pid, roles=["readPlugin", "executePlugin", "viewPersonalInfo"])
        uid = store_sample_series(dicom_dir / "head-first")
    return SimpleNamespace(plugin_id=pid, series_uid=uid)


def post_job(client, headers, plugin_id, series_uid, pvd=AUTO, **extra):
    body = {"pluginId": plugin_id,
            "series": [{"seriesUid": series_uid, "partialVolumeDescriptor": pvd}], **extra}
    return client.post("/api/plugin-jobs", json=body, headers=headers)


def set_job(app, job_id, **values):
    with app.app_context():
        db.session.execute(sa.update(PluginJob).where(PluginJob.job_id == job_id).values(**values))
        db.session.commit()


# --- POST ---------------------------------------------------------------------------------

def test_post_job_resolves_auto_and_queues(client, auth_headers, env, app):
    res = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid, priority=5)
    assert res.status_code == 201
    job_id = res.get_json()["jobId"]
    assert len(job_id) == 26
    res = client.get(f"/api/plugin-jobs/{job_id}", headers=auth_headers["bob"])
    assert res.status_code == 200
    job = res.get_json()
    assert job["status"] == "in_queue" and job["userEmail"] == "bob@example.com"
    assert job["series"] == [{"seriesUid": env.series_uid,
                              "partialVolumeDescriptor": {"start": 1, "end": 10, "delta": 1}}]
    assert job["results"] is None and job["feedbacks"] == [] and job["errorMessage"] is None
    assert job["startedAt"] is None and job["finishedAt"] is None
    assert "patientInfo" not in job
    with app.app_context():
        row = db.session.get(PluginJob, job_id)
        assert (row.queue_state, row.priority, row.domain) == ("wait", 5, "default")


def test_post_job_keeps_required_private_tags(client, auth_headers, env):
    body = {"pluginId": env.plugin_id, "series": [{
        "seriesUid": env.series_uid, "requiredPrivateTags": "0009,0010",
        "partialVolumeDescriptor": {"start": 2, "end": 8, "delta": 3}}]}
    res = client.post("/api/plugin-jobs", json=body, headers=auth_headers["bob"])
    assert res.status_code == 201
    job = client.get(f"/api/plugin-jobs/{res.get_json()['jobId']}",
                     headers=auth_headers["bob"]).get_json()
    assert job["series"][0]["requiredPrivateTags"] == "0009,0010"


def test_post_job_without_execute_plugin(client, auth_headers, env, app):
    with app.app_context():
        other = make_plugin(name="Read only").plugin_id
        db.session.commit()
        grant("bob@example.com", other, roles=["readPlugin"])
    res = post_job(client, auth_headers["bob"], other, env.series_uid)
    assert res.status_code == 401
    assert res.get_json()["error"] == 'You do not have "executePlugin" privilege of this plugin.'
    res = post_job(client, auth_headers["guest"], env.plugin_id, env.series_uid,
                   pvd={"start": 1, "end": 10, "delta": 1})
    assert res.status_code == 401
    with app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(PluginJob)).scalar() == 0


def test_post_job_unknown_plugin(client, auth_headers, env):
    res = post_job(client, auth_headers["bob"], "f" * 64, env.series_uid)
    assert res.status_code == 404
    assert res.get_json()["error"] == "The requested plugin/remotePlugin was not found."


@pytest.mark.parametrize("pvd, message", [
    ({"start": 1, "end": 4, "delta": 2},
     'Invalid partial volume descriptor: {"start":1,"end":4,"delta":2}'),
    ({"start": 1, "end": 4}, 'Invalid partial volume descriptor: {"start":1,"end":4}'),
    ({"start": 0, "end": 4, "delta": 1},
     'Invalid partial volume descriptor: {"start":0,"end":4,"delta":1}'),
    ({"start": 5, "end": 12, "delta": 1}, "Specified range is invalid."),
])
def test_post_job_invalid_descriptor(client, auth_headers, env, pvd, message):
    res = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid, pvd=pvd)
    assert res.status_code == 400
    assert res.get_json()["error"] == message


def test_post_job_unknown_series(client, auth_headers, env):
    res = post_job(client, auth_headers["bob"], env.plugin_id, "1.2.3.999",
                   pvd={"start": 1, "end": 1, "delta": 1})
    assert res.status_code == 400 and res.get_json()["error"] == "Nonexistent series."
    res = post_job(client, auth_headers["bob"], env.plugin_id, "1.2.3.999")
    assert res.status_code == 404
    assert res.get_json()["error"] == "The requested series was not found."


def test_post_job_on_series_outside_callers_domains(client, auth_headers, env, app, dicom_dir):
    with app.app_context():
        foreign = store_sample_series(dicom_dir / "foot-first", domain="elsewhere")
    res = post_job(client, auth_headers["bob"], env.plugin_id, foreign)
    assert res.status_code == 400
    assert res.get_json()["error"] == "You cannot access this series."


def test_post_job_series_of_two_domains(client, auth_headers, env, app, dicom_dir):
    with app.app_context():
        other = store_sample_series(dicom_dir / "foot-first", domain="second")
        grant("bob@example.com", env.plugin_id, roles=["readPlugin"], domains=["second"])
    body = {"pluginId": env.plugin_id, "series": [
        {"seriesUid": env.series_uid, "partialVolumeDescriptor": AUTO},
        {"seriesUid": other, "partialVolumeDescriptor": AUTO}]}
    res = client.post("/api/plugin-jobs", json=body, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "All series must belong to the same domain."


def test_post_duplicate_job(client, auth_headers, env, app):
    first = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    res = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid,
                   pvd={"start": 1, "end": 10, "delta": 1})
    assert res.status_code == 400
    assert res.get_json()["error"] == "There is a duplicate job that is already registered."
    assert post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid,
                    force=True).status_code == 201
    # another range is not a duplicate; a failed job does not count
    assert post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid,
                    pvd={"start": 1, "end": 9, "delta": 1}).status_code == 201
    set_job(app, first, status="failed", queue_state=None)
    res = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid, force=True)
    assert res.status_code == 201


def test_post_job_when_dicom_files_are_missing(client, auth_headers, env, app):
    with app.app_context():
        os.unlink(storage.instance_path(env.series_uid, 7))
    res = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid)
    assert res.status_code == 400
    assert res.get_json()["error"] == f"Series {env.series_uid} not found."


@pytest.mark.parametrize("body", [
    {"series": []}, {"force": False}, {"priority": "high"}, {"extra": 1},
    {"series": [{"seriesUid": "x", "partialVolumeDescriptor": "auto"}]},
])
def test_post_job_bad_bodies(client, auth_headers, env, body):
    full = {"pluginId": env.plugin_id,
            "series": [{"seriesUid": env.series_uid, "partialVolumeDescriptor": AUTO}]}
    full.update(body)
    res = client.post("/api/plugin-jobs", json=full, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


# --- GET one ------------------------------------------------------------------------------

def test_get_job_checks(client, auth_headers, env, app, dicom_dir):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    assert client.get("/api/plugin-jobs/nope", headers=auth_headers["bob"]).get_json() == {
        "error": "The requested pluginJob was not found."}
    res = client.get(f"/api/plugin-jobs/{job_id}", headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json()["error"] == 'You do not have "readPlugin" privilege of this plugin.'
    with app.app_context():  # a reader of the plug-in outside the job's domain
        grant("alice@example.com", env.plugin_id, roles=["readPlugin"], domains=[])
        db.session.execute(sa.update(Series).values(domain="elsewhere"))
        db.session.commit()
        grant("alice@example.com", env.plugin_id, roles=["readPlugin"], domains=["elsewhere"])
    res = client.get(f"/api/plugin-jobs/{job_id}", headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json()["error"] == "You do not have privilege to access this plugin-job."
    assert client.get(f"/api/plugin-jobs/{job_id}", headers=auth_headers["alice"]).status_code == 200


# --- PATCH --------------------------------------------------------------------------------

def test_cancel_queued_job(client, auth_headers, env, app):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={"status": "cancelled"},
                       headers=auth_headers["bob"])
    assert res.status_code == 204
    with app.app_context():
        row = db.session.get(PluginJob, job_id)
        assert (row.status, row.queue_state) == ("cancelled", None)
        assert jobs.claim_next_job("w1") is None


@pytest.mark.parametrize("status", ["finished", "processing", "failed", "cancelled"])
def test_cancel_job_that_is_not_queued(client, auth_headers, env, app, status):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    set_job(app, job_id, status=status, queue_state="processing" if status == "processing" else None)
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={"status": "cancelled"},
                       headers=auth_headers["bob"])
    assert res.status_code == 422
    assert res.get_json()["error"] == (
        f'You cannot cancel this job because its status is "{status}".')
    with app.app_context():
        assert db.session.get(PluginJob, job_id).status == status


def test_cancel_loses_the_race_against_a_worker(client, auth_headers, env, app):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    with app.test_request_context():
        g.user = db.session.get(User, "bob@example.com")
        g.privileges = auth.compute_privileges(g.user)
        job = jobs.get_job(job_id)          # read while still in the queue
        with app.app_context():                    # a worker, with a session of its own
            assert jobs.claim_next_job("worker-a") == job_id
        with pytest.raises(jobs.JobStateError) as caught:
            jobs.change_status(job, "cancelled")
        assert caught.value.message == (
            "You cannot cancel this job because it is already being processed.")
        db.session.expire_all()
        assert db.session.get(PluginJob, job_id).status == "processing"


def test_invalidate(client, auth_headers, env, app):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={"status": "invalidated"},
                       headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json()["error"] == "You do not have permission to invalidate this job."
    with app.app_context():
        grant("bob@example.com", env.plugin_id, roles=["readPlugin", "manageJobs"])
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={"status": "invalidated"},
                       headers=auth_headers["bob"])
    assert res.status_code == 422
    assert res.get_json()["error"] == (
        'You cannot invalidate this job because its status is "in_queue".')
    set_job(app, job_id, status="finished", queue_state=None)
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={"status": "invalidated"},
                       headers=auth_headers["bob"])
    assert res.status_code == 204
    with app.app_context():
        assert db.session.get(PluginJob, job_id).status == "invalidated"


@pytest.mark.parametrize("body", [{}, {"status": "finished"}, {"status": "cancelled", "x": 1}])
def test_patch_bad_body(client, auth_headers, env, body):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    res = client.patch(f"/api/plugin-jobs/{job_id}", json=body, headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_patch_privilege_is_checked_before_the_body(client, auth_headers, env, app):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    with app.app_context():
        grant("alice@example.com", env.plugin_id, roles=["readPlugin"])
    res = client.patch(f"/api/plugin-jobs/{job_id}", json={}, headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json()["error"] == 'You do not have "executePlugin" privilege of this plugin.'
    res = client.patch("/api/plugin-jobs/unknown", json={}, headers=auth_headers["alice"])
    assert res.status_code == 404


# --- search -------------------------------------------------------------------------------

@pytest.fixture
def two_jobs(client, auth_headers, env, app, dicom_dir):
    """Job A on head-first (bob sees patient info), job B on foot-first of a plug-in without
    viewPersonalInfo for bob."""
    with app.app_context():
        masked = make_plugin(name="Masked").plugin_id
        db.session.commit()
        grant("bob@example.com", masked, roles=["readPlugin", "executePlugin"])
        foot = store_sample_series(dicom_dir / "foot-first",
                                   patient_info={"patientId": "P2", "patientName": "Sakura",
                                                 "age": 60, "sex": "M"})
    a = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    b = post_job(client, auth_headers["bob"], masked, foot).get_json()["jobId"]
    set_job(app, a, status="finished", queue_state=None, results={"results": {"x": 1}})
    return SimpleNamespace(a=a, b=b, masked=masked, foot=foot)


def search_jobs(client, headers, **params):
    query = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()}
    return client.get("/api/plugin-jobs", query_string=query, headers=headers)


def test_search_items(client, auth_headers, env, two_jobs):
    res = search_jobs(client, auth_headers["bob"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 2 and body["page"] == 1
    items = {i["jobId"]: i for i in body["items"]}
    assert [i["jobId"] for i in body["items"]] == [two_jobs.b, two_jobs.a]  # createdAt desc
    a = items[two_jobs.a]
    assert "results" not in a and a["domain"] == "default" and a["status"] == "finished"
    assert a["patientInfo"] == {"patientId": "P1", "patientName": "Anzu", "age": 30, "sex": "F"}
    assert "patientInfo" not in items[two_jobs.b]          # no viewPersonalInfo role
    assert items[two_jobs.b]["domain"] == "default"


def test_search_patient_info_needs_the_preference(client, auth_headers, env, two_jobs, app):
    with app.app_context():
        user = db.session.get(User, "bob@example.com")
        user.preferences = {"personalInfoView": False}
        db.session.commit()
    items = search_jobs(client, auth_headers["bob"]).get_json()["items"]
    assert all("patientInfo" not in i for i in items)
    # the preference does not matter for searching
    res = search_jobs(client, auth_headers["bob"], filter={"patientInfo.patientName": "Anzu"})
    assert [i["jobId"] for i in res.get_json()["items"]] == [two_jobs.a]


def test_search_filters(client, auth_headers, env, two_jobs):
    def ids(flt):
        res = search_jobs(client, auth_headers["bob"], filter=flt)
        assert res.status_code == 200, res.get_json()
        return sorted(i["jobId"] for i in res.get_json()["items"])
    assert ids({"status": "finished"}) == [two_jobs.a]
    assert ids({"seriesUid": two_jobs.foot}) == [two_jobs.b]
    assert ids({"modality": "MR"}) == sorted([two_jobs.a, two_jobs.b])
    assert ids({"pluginId": two_jobs.masked}) == [two_jobs.b]
    # patient info is matched against the masked value: job B never matches
    assert ids({"patientInfo.patientId": "P2"}) == []
    assert ids({"patientInfo.age": {"$gte": 20}}) == [two_jobs.a]
    assert ids({"$or": [{"patientInfo.sex": "F"}, {"status": "in_queue"}]}) == sorted(
        [two_jobs.a, two_jobs.b])


@pytest.mark.parametrize("params, message", [
    ({"filter": {"results": 1}}, "Bad filter."),
    ({"filter": "{"}, "Invalid JSON was passed as a filter string"),
    ({"sort": "{"}, "Invalid sort parameter."),
    ({"sort": ""}, "Invalid sort parameter."),
    ({"sort": '{"createdAt": 2}'}, "Bad sort parameter. Invalid key/value pair."),
])
def test_search_errors(client, auth_headers, env, params, message):
    res = search_jobs(client, auth_headers["bob"], **params)
    assert res.status_code == 400 and res.get_json()["error"] == message


def test_search_patient_info_needs_global_privilege(client, auth_headers, env, two_jobs, app):
    with app.app_context():
        grant("guest@example.com", env.plugin_id, roles=["readPlugin", "viewPersonalInfo"])
    res = search_jobs(client, auth_headers["guest"], filter={"patientInfo.patientId": "P1"})
    assert res.status_code == 400
    assert res.get_json()["error"] == "You cannot search using patient information."
    items = search_jobs(client, auth_headers["guest"]).get_json()["items"]
    assert [i["jobId"] for i in items] == [two_jobs.a] and "patientInfo" not in items[0]


def test_search_visibility(client, auth_headers, env, two_jobs, app):
    assert search_jobs(client, auth_headers["alice"]).get_json()["totalItems"] == 0
    with app.app_context():  # readPlugin but another domain
        grant("alice@example.com", env.plugin_id, roles=["readPlugin"], domains=[])
        alice = db.session.get(User, "alice@example.com")
        alice.groups = alice.groups[-1:]
        db.session.commit()
    assert search_jobs(client, auth_headers["alice"]).get_json()["totalItems"] == 0


def test_search_sort_and_pages(client, auth_headers, env, two_jobs):
    res = search_jobs(client, auth_headers["bob"], sort={"createdAt": 1}, limit=1, page=2)
    body = res.get_json()
    assert body["totalItems"] == 2 and body["page"] == 2
    assert [i["jobId"] for i in body["items"]] == [two_jobs.b]
    res = search_jobs(client, auth_headers["bob"], sort={"status": 1})
    assert [i["status"] for i in res.get_json()["items"]] == ["finished", "in_queue"]


def test_search_in_my_list(client, auth_headers, env, two_jobs, app):
    with app.app_context():
        job_list = MyList(my_list_id="01listjobs", user_email="bob@example.com",
                          resource_type="pluginJobs", name="jobs")
        cases = MyList(my_list_id="01listcases", user_email="bob@example.com",
                       resource_type="clinicalCases", name="cases")
        db.session.add_all([job_list, cases])
        db.session.flush()
        db.session.add(MyListItem(my_list_id="01listjobs", resource_id=two_jobs.b))
        db.session.commit()
    res = client.get("/api/plugin-jobs/list/01listjobs", headers=auth_headers["bob"])
    assert res.status_code == 200
    assert [i["jobId"] for i in res.get_json()["items"]] == [two_jobs.b]
    res = client.get("/api/plugin-jobs/list/01listjobs?sort=%7B%22createdAt%22%3A-1%7D",
                     headers=auth_headers["bob"])
    assert res.status_code == 200 and res.get_json()["totalItems"] == 1
    res = client.get("/api/plugin-jobs/list/01listcases", headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "This my list is not for plugin jobs"
    res = client.get("/api/plugin-jobs/list/nothing", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json()["error"] == "This my list does not exist"


# --- attachments --------------------------------------------------------------------------

@pytest.fixture
def finished_job(client, auth_headers, env, app, tmp_path):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    set_job(app, job_id, status="finished", queue_state=None)
    with app.app_context():
        base = storage.results_dir(job_id)
    os.makedirs(os.path.join(base, "sub"))
    os.makedirs(os.path.join(base, ".hidden"))
    for name, data in [("results.json", b'{"results": {}}'), ("sub/image.png", b"\x89PNG"),
                       ("plugin-log.txt", b"log\n"), (".secret", b"x"), (".hidden/a", b"x")]:
        with open(os.path.join(base, name), "wb") as fh:
            fh.write(data)
    secret = tmp_path / "outside.txt"
    secret.write_text("outside")
    os.symlink(secret, os.path.join(base, "link.txt"))
    return job_id


def test_attachment_list_and_files(client, auth_headers, finished_job):
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment", headers=auth_headers["bob"])
    assert res.status_code == 200
    assert res.get_json() == ["plugin-log.txt", "results.json", "sub", "sub/image.png"]
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment/sub/image.png",
                     headers=auth_headers["bob"])
    assert res.status_code == 200 and res.data == b"\x89PNG"
    assert res.headers["Content-Type"] == "image/png"
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment/results.json",
                     headers=auth_headers["bob"])
    assert res.headers["Content-Type"] == "application/json" and res.get_json() == {"results": {}}
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment/missing.txt",
                     headers=auth_headers["bob"])
    assert res.status_code == 404


@pytest.mark.parametrize("path", ["../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd",
                                  "sub/../../x", "link.txt", "sub/%2E%2E/%2E%2E/x"])
def test_attachment_paths_cannot_leave_the_folder(client, auth_headers, finished_job, path):
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment/{path}",
                     headers=auth_headers["bob"])
    assert res.status_code == 400
    assert res.get_json()["error"] == "Invalid path prameter."


def test_absolute_attachment_paths(client, auth_headers, finished_job, app):
    # The router merges "attachment//etc" into "attachment/etc" (a redirect that stays inside)
    res = client.get(f"/api/plugin-jobs/{finished_job}/attachment/%2Fetc%2Fpasswd",
                     headers=auth_headers["bob"], follow_redirects=True)
    assert res.status_code == 404 and b"root:" not in res.data
    with app.app_context():
        for path in ("/etc/passwd", "\\etc\\passwd", "a\x00b"):
            with pytest.raises(jobs.ApiError) as caught:
                jobs.attachment_path(finished_job, path)
            assert caught.value.status == 400 and caught.value.message == "Invalid path prameter."


def test_attachment_of_job_without_results(client, auth_headers, env):
    job_id = post_job(client, auth_headers["bob"], env.plugin_id, env.series_uid).get_json()["jobId"]
    res = client.get(f"/api/plugin-jobs/{job_id}/attachment", headers=auth_headers["bob"])
    assert res.status_code == 200 and res.get_json() == []
    res = client.get(f"/api/plugin-jobs/{job_id}/attachment", headers=auth_headers["guest"])
    assert res.status_code == 401
