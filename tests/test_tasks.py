"""Tasks: /api/tasks (list, get, report, download, dismiss) and the task rows."""
import json
import os
from datetime import timedelta

import pytest

import storage
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


# --- the report stream ------------------------------------------------------------------------

def parse_events(text):
    """[(event, data dict)] of an SSE text."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines and lines[0].startswith("event: "):
            events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


class Stream:
    """Drive tasks.report_stream one poll at a time with a fake clock."""

    def __init__(self, app, user="alice@example.com"):
        self.now = 0.0
        with app.app_context():
            engine = db.engine
        self.gen = tasks.report_stream(engine, user, 0.5, clock=lambda: self.now,
                                       sleep=self._sleep)

    def _sleep(self, seconds):
        self.now += seconds

    def first(self):
        return next(self.gen)

    def poll(self):
        return next(self.gen)


def test_report_route_headers_and_first_byte(app, client, auth_headers):
    app.config["TASK_REPORT_POLL_INTERVAL"] = 0.01
    task_id = add_task(app)
    res = client.get("/api/tasks/report", headers=auth_headers["alice"], buffered=False)
    try:
        assert res.status_code == 200
        assert res.headers["Content-Type"].startswith("text/event-stream")
        assert res.headers["X-Accel-Buffering"] == "no"
        text = next(iter(res.response)).decode()
        assert text == ('\nevent: progress\ndata: {"taskId":"%s","message":"Starting the task."}'
                        '\n\n' % task_id)
    finally:
        res.close()


def test_report_needs_a_token(client):
    assert client.get("/api/tasks/report").status_code == 401


def test_report_progress_finish_and_error(app):
    running = add_task(app)
    add_task(app, user="bob@example.com")  # someone else's: never reported
    add_task(app, status="finished", ended_at=utcnow() - timedelta(minutes=5))
    stream = Stream(app)
    first = stream.first()
    assert first.startswith("\n")
    assert parse_events(first) == [("progress", {"taskId": running,
                                                 "message": "Starting the task."})]
    with app.app_context():
        tasks._update(running, message="Packing data for x", finished=1, total=3)
    text = stream.poll()
    assert text == ('event: progress\ndata: {"taskId":"%s","message":"Packing data for x",'
                    '"finished":1,"total":3}\n\n' % running)
    with app.app_context():
        tasks.finish(running, "Exported 3 case(s).")
    assert parse_events(stream.poll()) == [
        ("finish", {"taskId": running, "message": "Exported 3 case(s)."})]
    other = add_task(app)
    with app.app_context():
        tasks.fail(other, "The series files are missing.")
    assert parse_events(stream.poll()) == [
        ("error", {"taskId": other, "message": "The series files are missing."})]


def test_report_sends_each_state_once_and_keeps_alive(app):
    running = add_task(app)
    stream = Stream(app)
    stream.first()
    outputs = [stream.poll() for _ in range(25)]  # 12.5 s of polls without any change
    assert parse_events("".join(outputs)) == []
    assert outputs.count(":\n") == 1  # one keep-alive comment per 10 s
    with app.app_context():
        tasks.finish(running)
    events = parse_events(stream.poll())
    assert events == [("finish", {"taskId": running, "message": "Finished."})]


def test_report_dismiss_does_not_repeat_finish(app, client, auth_headers):
    running = add_task(app)
    stream = Stream(app)
    stream.first()
    with app.app_context():
        tasks.finish(running)
    assert len(parse_events(stream.poll())) == 1
    res = client.patch(f"/api/tasks/{running}", json={"dismissed": True},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert parse_events(stream.poll()) == []


def test_report_task_created_and_finished_between_polls(app):
    stream = Stream(app)
    assert parse_events(stream.first()) == []
    quick = add_task(app)
    with app.app_context():
        tasks.finish(quick, "done")
    assert parse_events(stream.poll()) == [("finish", {"taskId": quick, "message": "done"})]


# --- download ---------------------------------------------------------------------------------

def finished_with_file(app, content=b"archive bytes", mime="application/x-tgz", **fields):
    task_id = add_task(app, status="finished", download=mime, ended_at=utcnow(), **fields)
    with app.app_context():
        storage.write_atomic(storage.download_path(task_id), content)
    return task_id


def test_download(app, client, auth_headers):
    task_id = finished_with_file(app, b"x" * 70000)
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.data == b"x" * 70000
    assert res.headers["Content-Type"] == "application/gzip"
    assert res.headers["Content-Length"] == "70000"
    assert res.headers["Content-Disposition"] == 'attachment; filename="download.tar.gz"'


def test_download_zip(app, client, auth_headers):
    task_id = finished_with_file(app, b"PK", mime="application/zip")
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.headers["Content-Type"] == "application/zip"
    assert res.headers["Content-Disposition"] == 'attachment; filename="download.zip"'


def test_download_by_another_user_is_not_found(app, client, auth_headers):
    task_id = finished_with_file(app)
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["bob"])
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested task was not found."}


def test_download_before_the_end(app, client, auth_headers):
    task_id = add_task(app, download="application/x-tgz")
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 409
    assert res.get_json() == {"error": "This task has not been completed."}


def test_download_of_task_without_file(app, client, auth_headers):
    task_id = add_task(app, status="finished")
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "This task is not associated with a downloadable file."}


def test_download_gone(app, client, auth_headers):
    task_id = add_task(app, status="finished", download="application/zip")
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 404
    assert res.get_json() == {"error": f"The requested download file for the task {task_id} "
                                       "is no longer available."}


def test_download_unknown_task(client, auth_headers):
    res = client.get("/api/tasks/nope/download", headers=auth_headers["alice"])
    assert res.status_code == 404


@pytest.mark.parametrize("mime, ext", [("application/x-tgz", "tar.gz"), ("application/zip", "zip"),
                                       ("application/octet-stream", "bin")])
def test_download_extension(mime, ext):
    assert tasks.download_extension(mime) == ext


# --- dismiss ----------------------------------------------------------------------------------

def test_dismiss_deletes_the_download(app, client, auth_headers):
    task_id = finished_with_file(app)
    res = client.patch(f"/api/tasks/{task_id}", json={"dismissed": True},
                       headers=auth_headers["alice"])
    assert res.status_code == 204 and res.data == b""
    with app.app_context():
        assert db.session.get(Task, task_id).dismissed is True
        assert not os.path.exists(storage.download_path(task_id))
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 404


def test_undismiss_keeps_the_file(app, client, auth_headers):
    task_id = finished_with_file(app, dismissed=True)
    res = client.patch(f"/api/tasks/{task_id}", json={"dismissed": False},
                       headers=auth_headers["alice"])
    assert res.status_code == 204
    assert client.get(f"/api/tasks/{task_id}/download",
                      headers=auth_headers["alice"]).status_code == 200


def test_dismiss_error_task_is_allowed(app, client, auth_headers):
    task_id = add_task(app, status="error", error_message="boom")
    res = client.patch(f"/api/tasks/{task_id}", json={"dismissed": True},
                       headers=auth_headers["alice"])
    assert res.status_code == 204


def test_dismiss_running_task_is_refused(app, client, auth_headers):
    task_id = add_task(app)
    res = client.patch(f"/api/tasks/{task_id}", json={"dismissed": True},
                       headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "The task is not completed yet."}


@pytest.mark.parametrize("body", [{}, {"dismissed": 1}, {"dismissed": True, "x": 1}, [True]])
def test_dismiss_bad_body(app, client, auth_headers, body):
    task_id = add_task(app, status="finished")
    res = client.patch(f"/api/tasks/{task_id}", json=body, headers=auth_headers["alice"])
    assert res.status_code == 400
    assert res.get_json() == {"error": "Bad Request"}


def test_dismiss_someone_elses_task(app, client, auth_headers):
    task_id = add_task(app, status="finished")
    res = client.patch(f"/api/tasks/{task_id}", json={"dismissed": True},
                       headers=auth_headers["bob"])
    assert res.status_code == 401
    assert res.get_json() == {"error": "You cannot access this task."}


# --- sweeping ---------------------------------------------------------------------------------

def test_sweep_downloads(app):
    old = finished_with_file(app)
    new = finished_with_file(app)
    with app.app_context():
        folder = storage.root("downloads")
        stale_tmp = os.path.join(folder, ".tmp-dead")
        live_tmp = os.path.join(folder, ".tmp-live")
        for path in (stale_tmp, live_tmp):
            open(path, "wb").close()
        past = __import__("time").time() - 8 * 86400
        os.utime(storage.download_path(old), (past, past))
        os.utime(stale_tmp, (past, past))
        assert tasks.sweep_downloads(7 * 86400) == 2
        assert sorted(os.listdir(folder)) == sorted([new, ".tmp-live"])
