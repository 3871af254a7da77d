"""Tasks: /api/tasks (list, get, report, download, dismiss) and the task rows."""
import json
from datetime import timedelta

import pytest

import tasks
from models import Task, db, utcnow


def add_task(app, user="alice@example.com", status="processing", download=None, **fields):
    """A task row of ``user``; returns its id."""
    with app.app_context():
        task = tasks.create_task(user, "Test task", "test", download_file_type=download)
        task.status = status
        for key, value in fields.items():
            setattr(task, key, value)
        db.session.commit()
        return task.task_id


def test_list_shows_only_own_tasks(app, client, auth_headers):
    mine = add_task(app)
    add_task(app, user="bob@example.com")
    res = client.get("/api/tasks", headers=auth_headers["alice"])
    assert res.status_code == 200
    body = res.get_json()
    assert body["totalItems"] == 1 and body["page"] == 1
    item = body["items"][0]
    assert item["taskId"] == mine
    assert set(item) == {"taskId", "userEmail", "name", "status", "errorMessage",
                         "finishedMessage", "endedAt", "downloadFileType", "dismissed",
                         "createdAt", "updatedAt"}
    assert item["status"] == "processing" and item["dismissed"] is False


def test_list_filters_by_status_and_dismissed(app, client, auth_headers):
    done = add_task(app, status="finished")
    add_task(app, status="finished", dismissed=True)
    add_task(app)
    flt = json.dumps({"status": "finished", "dismissed": False})
    res = client.get("/api/tasks", query_string={"filter": flt}, headers=auth_headers["alice"])
    assert [t["taskId"] for t in res.get_json()["items"]] == [done]


@pytest.mark.parametrize("query, message", [
    ({"filter": "{bad"}, "Filter string could not be parsed."),
    ({"filter": '{"userEmail": "bob@example.com"}'}, "Bad filter."),
])
def test_list_bad_filter(client, auth_headers, query, message):
    res = client.get("/api/tasks", query_string=query, headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


def test_list_repeated_filter_is_refused(client, auth_headers):
    res = client.get("/api/tasks?filter={}&filter={}", headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Filter string could not be parsed."}


def test_list_default_sort_is_newest_first(app, client, auth_headers):
    old = add_task(app, created_at=utcnow() - timedelta(hours=1))
    new = add_task(app)
    res = client.get("/api/tasks", headers=auth_headers["alice"])
    assert [t["taskId"] for t in res.get_json()["items"]] == [new, old]


def test_list_marks_zombies_as_error(app, client, auth_headers):
    zombie = add_task(app, claimed_by="host:1", heartbeat_at=utcnow() - timedelta(hours=1))
    alive = add_task(app, claimed_by="host:2", heartbeat_at=utcnow())
    queued = add_task(app)
    items = {t["taskId"]: t for t in client.get(
        "/api/tasks", headers=auth_headers["alice"]).get_json()["items"]}
    assert items[zombie]["status"] == "error"
    assert items[zombie]["errorMessage"] == tasks.INTERRUPTED
    assert items[zombie]["endedAt"] is not None
    assert items[alive]["status"] == "processing"
    assert items[queued]["status"] == "processing"
    with app.app_context():
        assert db.session.get(Task, zombie).status == "error"


def test_get_task(app, client, auth_headers):
    task_id = add_task(app)
    res = client.get(f"/api/tasks/{task_id}", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.get_json()["taskId"] == task_id
    assert res.get_json()["name"] == "Test task"


def test_get_task_of_someone_else(app, client, auth_headers):
    task_id = add_task(app, user="bob@example.com")
    res = client.get(f"/api/tasks/{task_id}", headers=auth_headers["alice"])
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot access this task."}


def test_get_unknown_task(client, auth_headers):
    res = client.get("/api/tasks/01hzzzzzzzzzzzzzzzzzzzzzzz", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested task was not found."}


def test_tasks_need_a_token(client):
    assert client.get("/api/tasks").status_code == 401
