"""Feedback on plug-in jobs: /api/plugin-jobs/<jobId>/feedback[...]."""
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from models import Feedback, PluginJob, db
from tests.factories import make_plugin
from tests.plugin_helpers import grant, store_sample_series

LOG = [{"date": "2024-01-05T03:00:01.5+09:00", "action": "open"},
       {"date": "2024-01-05T03:00:02Z", "action": "select", "data": {"id": 1}}]


@pytest.fixture
def job(client, auth_headers, app, tokens, dicom_dir):
    """A finished job; bob may give personal and consensual feedback, alice manages it."""
    with app.app_context():
        pid = make_plugin().plugin_id
        db.session.commit()
        grant("bob@example.com", pid, roles=["readPlugin", "executePlugin",
                                             "inputPersonalFeedback", "inputConsensualFeedback"])
        grant("alice@example.com", pid, roles=["readPlugin", "inputPersonalFeedback",
                                               "manageFeedback"])
        uid = store_sample_series(dicom_dir / "head-first")
    res = client.post("/api/plugin-jobs", json={"pluginId": pid, "series": [
        {"seriesUid": uid, "partialVolumeDescriptor": "auto"}]}, headers=auth_headers["bob"])
    job_id = res.get_json()["jobId"]
    with app.app_context():
        db.session.execute(sa.update(PluginJob).where(PluginJob.job_id == job_id)
                           .values(status="finished", queue_state=None))
        db.session.commit()
    return SimpleNamespace(id=job_id, plugin_id=pid, url=f"/api/plugin-jobs/{job_id}/feedback")


def post(client, headers, url, kind, body=None):
    return client.post(f"{url}/{kind}", json=body if body is not None else
                       {"data": {"lesions": [1, 0]}, "actionLog": LOG}, headers=headers)


def test_personal_feedback_is_stored_and_listed(client, auth_headers, job):
    res = post(client, auth_headers["bob"], job.url, "personal")
    assert res.status_code == 200
    feedback_id = res.get_json()["feedbackId"]
    assert len(feedback_id) == 26
    res = client.get(job.url, headers=auth_headers["bob"])
    assert res.status_code == 200
    [entry] = res.get_json()
    assert entry["feedbackId"] == feedback_id and entry["isConsensual"] is False
    assert entry["userEmail"] == "bob@example.com" and entry["data"] == {"lesions": [1, 0]}
    assert entry["actionLog"] == [
        {"date": "2024-01-04T18:00:01.500Z", "action": "open"},
        {"date": "2024-01-05T03:00:02.000Z", "action": "select", "data": {"id": 1}}]
    job_doc = client.get(f"/api/plugin-jobs/{job.id}", headers=auth_headers["bob"]).get_json()
    assert job_doc["feedbacks"] == [entry]


def test_feedback_without_action_log_stores_an_empty_one(client, auth_headers, job):
    assert post(client, auth_headers["bob"], job.url, "personal", {"data": 3}).status_code == 200
    [entry] = client.get(job.url, headers=auth_headers["bob"]).get_json()
    assert entry["actionLog"] == [] and entry["data"] == 3


def test_personal_feedback_twice(client, auth_headers, job, app):
    assert post(client, auth_headers["bob"], job.url, "personal").status_code == 200
    res = post(client, auth_headers["bob"], job.url, "personal")
    assert res.status_code == 400
    assert res.get_json()["error"] == "Personal feedback of this user has been already registered."
    assert post(client, auth_headers["alice"], job.url, "personal").status_code == 200
    with app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(Feedback)).scalar() == 2


def test_nothing_after_a_consensual_feedback(client, auth_headers, job):
    assert post(client, auth_headers["bob"], job.url, "consensual").status_code == 200
    for who, kind in [("bob", "consensual"), ("alice", "personal")]:
        res = post(client, auth_headers[who], job.url, kind)
        assert res.status_code == 400
        assert res.get_json()["error"] == "A consensual feedback has been already registered."


@pytest.mark.parametrize("who, kind, role", [
    ("alice", "consensual", "inputConsensualFeedback"),
    ("guest", "personal", "inputPersonalFeedback")])
def test_feedback_needs_its_role(client, auth_headers, job, who, kind, role):
    res = post(client, auth_headers[who], job.url, kind, {"bad": "body"})
    assert res.status_code == 401
    assert res.get_json()["error"] == f'You do not have "{role}" privilege of this plugin.'


@pytest.mark.parametrize("body", [
    {"actionLog": [{"action": "x"}]}, {"actionLog": [{"date": "yesterday", "action": "x"}]},
    {"actionLog": [{"date": "2024-01-01T00:00:00Z", "action": "x", "extra": 1}]},
    {"other": 1}])
def test_feedback_bad_bodies(client, auth_headers, job, body):
    res = post(client, auth_headers["bob"], job.url, "personal", body)
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."
    assert client.get(job.url, headers=auth_headers["bob"]).get_json() == []


def test_delete_feedback_rules(client, auth_headers, job):
    personal = post(client, auth_headers["alice"], job.url, "personal").get_json()["feedbackId"]
    consensual = post(client, auth_headers["bob"], job.url, "consensual").get_json()["feedbackId"]
    res = client.delete(f"{job.url}/{personal}", headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json()["error"] == (
        "Cannot delete personal feedback when consensual feedback exists.")
    res = client.delete(f"{job.url}/01unknownfeedback", headers=auth_headers["alice"])
    assert res.status_code == 404 and res.get_json()["error"] == "Feedback not found."
    res = client.delete(f"{job.url}/{consensual}", headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json()["error"] == 'You do not have "manageFeedback" privilege of this plugin.'
    assert client.delete(f"{job.url}/{consensual}", headers=auth_headers["alice"]).status_code == 204
    assert client.delete(f"{job.url}/{personal}", headers=auth_headers["alice"]).status_code == 204
    assert client.get(job.url, headers=auth_headers["bob"]).get_json() == []


def test_delete_all_feedback(client, auth_headers, job):
    post(client, auth_headers["alice"], job.url, "personal")
    post(client, auth_headers["bob"], job.url, "consensual")
    assert client.delete(f"{job.url}/all", headers=auth_headers["alice"]).status_code == 204
    assert client.get(job.url, headers=auth_headers["bob"]).get_json() == []
    assert post(client, auth_headers["bob"], job.url, "personal").status_code == 200


def test_feedback_on_unknown_job(client, auth_headers, job):
    res = client.post("/api/plugin-jobs/nope/feedback/personal", json={},
                      headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json()["error"] == "The requested pluginJob was not found."
