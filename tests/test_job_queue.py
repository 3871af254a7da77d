"""The job queue: /api/plugin-job-queue, /api/admin/plugin-job-queue, the job manager switch
and the exactly-once claim."""
import threading
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from models import PluginJob, SystemState, db
from plugins import jobs
from tests.factories import make_plugin
from tests.plugin_helpers import grant, store_sample_series


@pytest.fixture
def queue(client, auth_headers, app, tokens, dicom_dir):
    """Jobs of bob (priorities 0, 5, 0) and one of alice, in that order of creation."""
    with app.app_context():
        pid = make_plugin().plugin_id
        db.session.commit()
        for who in ("bob", "alice"):
            grant(f"{who}@example.com", pid, roles=["readPlugin", "executePlugin"])
        uid = store_sample_series(dicom_dir / "head-first")
    ids = []
    for who, priority, end in [("bob", 0, 10), ("bob", 5, 9), ("bob", 0, 8), ("alice", 1, 7)]:
        res = client.post("/api/plugin-jobs", headers=auth_headers[who], json={
            "pluginId": pid, "priority": priority,
            "series": [{"seriesUid": uid, "partialVolumeDescriptor": {
                "start": 1, "end": end, "delta": 1}}]})
        assert res.status_code == 201
        ids.append(res.get_json()["jobId"])
    return SimpleNamespace(plugin_id=pid, series_uid=uid, ids=ids)


def test_user_queue_shows_own_jobs_by_priority(client, auth_headers, queue):
    res = client.get("/api/plugin-job-queue", headers=auth_headers["bob"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 3 and body["page"] == 1
    b0, b5, b0b, _a = queue.ids
    assert [i["jobId"] for i in body["items"]] == [b5, b0, b0b]
    assert body["items"][0]["status"] == "in_queue" and "results" in body["items"][0]
    res = client.get("/api/plugin-job-queue?limit=2&page=2", headers=auth_headers["bob"])
    assert [i["jobId"] for i in res.get_json()["items"]] == [b0b]
    assert client.get("/api/plugin-job-queue", headers=auth_headers["guest"]).get_json() == {
        "items": [], "page": 1, "totalItems": 0}


def test_queue_states(client, auth_headers, queue, app):
    with app.app_context():
        assert jobs.claim_next_job("w1") == queue.ids[1]
    def ids(state):
        res = client.get(f"/api/plugin-job-queue?state={state}", headers=auth_headers["bob"])
        return [i["jobId"] for i in res.get_json()["items"]]
    assert ids("processing") == [queue.ids[1]]
    assert ids("wait") == [queue.ids[0], queue.ids[2]]
    assert ids("bogus") == ids("wait")
    assert sorted(ids("all")) == sorted([queue.ids[0], queue.ids[1], queue.ids[2]])


def test_admin_queue(client, auth_headers, queue):
    res = client.get("/api/admin/plugin-job-queue", headers=auth_headers["alice"])
    assert res.status_code == 200
    b0, b5, b0b, a1 = queue.ids
    assert [i["jobId"] for i in res.get_json()["items"]] == [b5, a1, b0, b0b]
    assert res.get_json()["totalItems"] == 4
    res = client.get("/api/admin/plugin-job-queue?limit=500", headers=auth_headers["alice"])
    assert len(res.get_json()["items"]) == 4
    res = client.get("/api/admin/plugin-job-queue", headers=auth_headers["bob"])
    assert res.status_code == 401


def test_claim_order_is_priority_then_fifo(app, queue):
    b0, b5, b0b, a1 = queue.ids
    with app.app_context():
        assert [jobs.claim_next_job("w") for _ in range(5)] == [b5, a1, b0, b0b, None]
        job = db.session.get(PluginJob, b5)
        assert (job.status, job.queue_state, job.claimed_by) == ("processing", "processing", "w")
        assert job.started_at is not None and job.updated_at == job.created_at


def test_claim_is_exactly_once_among_racing_workers(app, queue):
    claimed, barrier = [], threading.Barrier(4)

    def worker(name):
        with app.app_context():
            barrier.wait()
            while True:
                job_id = jobs.claim_next_job(name)
                if job_id is None:
                    remaining = db.session.execute(sa.select(sa.func.count()).where(
                        PluginJob.queue_state == "wait")).scalar()
                    db.session.rollback()
                    if not remaining:
                        return
                    continue
                claimed.append((job_id, name))
    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in claimed) == sorted(queue.ids)
    with app.app_context():
        rows = db.session.execute(sa.select(PluginJob.job_id, PluginJob.claimed_by)).all()
        assert dict(rows) == dict(claimed)


def test_manager_switch(client, auth_headers, queue, app):
    res = client.get("/api/admin/plugin-job-manager", headers=auth_headers["alice"])
    assert res.status_code == 200 and res.get_json() == {"status": "running"}
    res = client.put("/api/admin/plugin-job-manager/switch", json={"status": "stopped"},
                     headers=auth_headers["alice"])
    assert res.status_code == 200 and res.get_json() == {"status": "stopped"}
    assert client.get("/api/admin/plugin-job-manager",
                      headers=auth_headers["alice"]).get_json() == {"status": "stopped"}
    with app.app_context():
        assert db.session.get(SystemState, "plugin_job_manager").value == "stopped"
        assert jobs.claim_next_job("w") is None          # a stopped manager takes nothing
        assert db.session.execute(sa.select(sa.func.count()).where(
            PluginJob.queue_state == "wait")).scalar() == 4      # and the queue stays
    client.put("/api/admin/plugin-job-manager/switch", json={"status": "running"},
               headers=auth_headers["alice"])
    with app.app_context():
        assert jobs.claim_next_job("w") == queue.ids[1]


@pytest.mark.parametrize("body, message", [
    ({}, "Bad Request"), ({"status": "paused"}, "Request data is not correct.")])
def test_manager_switch_bad_bodies(client, auth_headers, body, message):
    res = client.put("/api/admin/plugin-job-manager/switch", json=body,
                     headers=auth_headers["alice"])
    assert res.status_code == 400 and res.get_json()["error"] == message


@pytest.mark.parametrize("method, path", [
    ("get", "/api/admin/plugin-job-manager"), ("put", "/api/admin/plugin-job-manager/switch")])
def test_manager_needs_manage_server(client, auth_headers, method, path):
    res = getattr(client, method)(path, json={"status": "stopped"}, headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json()["error"] == (
        "You do not have sufficient privilege to access this resource.manageServer")
