"""The worker: exactly-once claims, SIGTERM, dead workers, periodic sweeps.

Some tests run the real ``flask --app app worker`` in a subprocess on the test's database.
"""
import ast
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

import storage
import tasks
import worker
from models import Task, db, utcnow
from tests.sample_series import store_series
from tests.test_imports import project_modules

ROOT = Path(__file__).resolve().parents[1]


def queue(app, count, kind="test", params=None, user="alice@example.com"):
    with app.app_context():
        rows = [tasks.create_task(user, f"Task {i}", kind, params=params) for i in range(count)]
        db.session.commit()
        return [row.task_id for row in rows]


def row(app, task_id):
    with app.app_context():
        db.session.expire_all()
        return db.session.get(Task, task_id)


def wait_for(condition, timeout=60, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


# --- exactly-once claims --------------------------------------------------------------------

def test_racing_workers_never_take_the_same_task(app):
    ids = queue(app, 60)
    claims = {}
    errors = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def run(name):
        try:
            with app.app_context():
                start.wait()
                while True:
                    task_id = tasks.claim_next(name)
                    if task_id is None:
                        left = db.session.execute(db.select(db.func.count()).where(
                            Task.claimed_by.is_(None))).scalar_one()
                        db.session.rollback()
                        if not left:
                            return
                        continue
                    with lock:
                        claims.setdefault(task_id, []).append(name)
        except Exception as exc:  # reported below, so a crash is not a silent pass
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"worker-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(claims) == sorted(ids)
    assert all(len(names) == 1 for names in claims.values())
    with app.app_context():
        stored = dict(db.session.execute(db.select(Task.task_id, Task.claimed_by)).all())
    assert stored == {task_id: names[0] for task_id, names in claims.items()}
    assert len(set(stored.values())) > 1  # the workers really raced


def test_claim_takes_the_oldest_first(app):
    ids = queue(app, 3)
    with app.app_context():
        db.session.get(Task, ids[2]).created_at = utcnow() - timedelta(minutes=5)
        db.session.commit()
        assert tasks.claim_next("w") == ids[2]
        assert tasks.claim_next("w") == ids[0]


def test_claim_skips_ended_and_claimed_tasks(app):
    done, claimed, free = queue(app, 3)
    with app.app_context():
        tasks.finish(done)
        assert tasks.claim_next("a") == claimed
        assert tasks.claim_next("b") == free
        assert tasks.claim_next("c") is None


def test_unknown_kind_ends_with_an_error(app):
    (task_id,) = queue(app, 1, kind="no-such-kind")
    with app.app_context():
        worker.run_pending()
    task = row(app, task_id)
    assert task.status == "error" and task.error_message == "Unknown task kind no-such-kind."


def created_task_kinds():
    """The kind of every ``tasks.create_task(...)`` call in the project (a literal string)."""
    kinds = set()
    for name, path in project_modules().items():
        if name.startswith("tests"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "create_task"):
                kind = next((k.value for k in node.keywords if k.arg == "kind"),
                            node.args[2] if len(node.args) > 2 else None)
                assert isinstance(kind, ast.Constant), f"{path}:{node.lineno}: kind not a literal"
                kinds.add(kind.value)
    return kinds


def test_every_task_kind_the_code_creates_has_a_handler():
    kinds = created_task_kinds()
    assert {"series_import", "export-mhd", "export-cs-volume"} <= kinds
    assert kinds == set(worker.TASK_HANDLERS)


# --- the real worker process ----------------------------------------------------------------

def start_worker(app):
    env = {**os.environ, "CIRCUS_DATA_DIR": app.config["CIRCUS_DATA_DIR"],
           "CIRCUS_WORKER_POLL_INTERVAL": "0.05", "PYTHONUNBUFFERED": "1"}
    if app.config.get("DATABASE_URL"):
        env["DATABASE_URL"] = app.config["DATABASE_URL"]
    return subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "worker"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc, sig=signal.SIGTERM, timeout=60):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError("the worker did not stop:\n" + output)
    return output


@pytest.fixture
def big_series(app, dicom_dir):
    """A 512x512x60 CT series (the same slice 60 times): an export takes a moment."""
    with app.app_context():
        return store_series([dicom_dir / "misc" / "CT-MONO2-16-brain.dcm"] * 60,
                            series_uid="1.2.826.0.1.3680043.10.999.60")


def export_params(uid, volumes=3):
    entry = {"seriesUid": uid, "partialVolumeDescriptor": {"start": 1, "end": 60, "delta": 1}}
    return {"series": [entry] * volumes, "compressionFormat": "tgz"}


def queue_exports(app, uid, count, volumes=10):
    ids = queue(app, count, kind="export-cs-volume", params=export_params(uid, volumes))
    with app.app_context():
        for task_id in ids:
            db.session.get(Task, task_id).download_file_type = "application/x-tgz"
        db.session.commit()
    return ids


def test_sigterm_stops_after_the_current_task(app, big_series):
    first, second = queue_exports(app, big_series, 2)
    proc = start_worker(app)
    try:
        wait_for(lambda: row(app, first).claimed_by)
    except AssertionError:
        raise AssertionError(stop(proc))
    output = stop(proc)  # one SIGTERM while the first export runs
    assert proc.returncode == 0, output
    assert "stopping after the current work" in output
    done = row(app, first)
    assert done.status == "finished", (done.status, done.error_message, output)
    with app.app_context():
        assert os.path.getsize(storage.download_path(first)) > 0
    waiting = row(app, second)
    assert waiting.status == "processing" and waiting.claimed_by is None


def test_second_sigterm_interrupts_the_task(app, big_series):
    (task_id,) = queue_exports(app, big_series, 1)
    proc = start_worker(app)
    try:
        wait_for(lambda: row(app, task_id).claimed_by)
    except AssertionError:
        raise AssertionError(stop(proc))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    output = stop(proc)  # the second SIGTERM
    assert proc.returncode == 0, output
    task = row(app, task_id)
    assert task.status == "error", output
    assert task.error_message == tasks.INTERRUPTED
    with app.app_context():
        assert os.listdir(storage.root("downloads")) == []


def test_task_of_a_killed_worker_is_failed(app, client, auth_headers, big_series):
    (task_id,) = queue_exports(app, big_series, 1)
    proc = start_worker(app)
    try:
        wait_for(lambda: row(app, task_id).claimed_by)
    finally:
        stop(proc, signal.SIGKILL)
    left = row(app, task_id)
    assert left.status == "processing" and left.claimed_by  # nobody ran it to its end
    with app.app_context():  # the heartbeat stopped with the process: let time pass
        db.session.get(Task, task_id).heartbeat_at = utcnow() - tasks.STALE_AFTER * 2
        db.session.commit()
    res = client.get("/api/tasks", headers=auth_headers["alice"])
    item = next(t for t in res.get_json()["items"] if t["taskId"] == task_id)
    assert item["status"] == "error"
    assert item["errorMessage"] == ("The task was interrupted because the worker running it "
                                    "stopped.")


def test_new_worker_fails_a_dead_workers_task_and_sweeps(app, dicom_dir):
    (stale,) = queue(app, 1)
    with app.app_context():
        task = db.session.get(Task, stale)
        task.claimed_by, task.heartbeat_at = "ghost-host:1", utcnow() - timedelta(hours=1)
        db.session.commit()
        old = storage.download_path("01oldoldoldoldoldoldoldold")
        storage.write_atomic(old, b"old archive")
        past = time.time() - app.config["DOWNLOAD_RETENTION_SECONDS"] - 60
        os.utime(old, (past, past))
    proc = start_worker(app)
    try:
        wait_for(lambda: row(app, stale).status == "error" and not os.path.exists(old))
    finally:
        output = stop(proc)
    assert row(app, stale).error_message == tasks.INTERRUPTED, output


def test_worker_runs_queued_export_end_to_end(app, client, auth_headers, big_series):
    (task_id,) = queue_exports(app, big_series, 1, volumes=1)
    proc = start_worker(app)
    try:
        wait_for(lambda: row(app, task_id).status != "processing")
    finally:
        output = stop(proc)
    assert row(app, task_id).status == "finished", output
    res = client.get(f"/api/tasks/{task_id}/download", headers=auth_headers["alice"])
    assert res.status_code == 200 and res.data[:2] == b"\x1f\x8b"
