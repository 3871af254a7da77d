"""Several hosts: two API servers (gunicorn) and two workers, each pair with a data folder
of its own, sharing nothing but a PostgreSQL database and an S3 store.

A series uploaded through one host is searched, viewed (/rs), exported and used by a
plug-in job through the other; every task is claimed by exactly one worker. Needs
DATABASE_URL (PostgreSQL) and an S3 store (../shared/tools/s3-throwaway.sh start); skips
without them.
"""
import io
import os
import signal
import sys
import tarfile
import time
import uuid
import zipfile

import pytest
import requests

from app import create_app
from models import Task, User, db
from tests.factories import make_group
from tests.conftest import DICOM_DIR
from tests.dicom_factory import dicom_bytes
from tests.plugin_helpers import grant, remote_definition
from tests.remote_plugin_server import RemotePlugin
from tests.scratch_db import scratch_database_url
from tests.test_e2e import Server, flask_cli, wait_for_task

pytestmark = [pytest.mark.e2e, pytest.mark.storage,
              pytest.mark.skipif(not os.environ.get("DATABASE_URL")
                                 or not os.environ.get("CIRCUS_S3_ENDPOINT_URL"),
                                 reason="several hosts need DATABASE_URL (PostgreSQL) and an "
                                        "S3 store (../shared/tools/s3-throwaway.sh start)")]


def head_first_zip():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted((DICOM_DIR / "head-first").glob("*.dcm")):
            archive.write(path, path.name)
    return out.getvalue()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hosts")
    storage_url = f"s3://circus-test/hosts-{uuid.uuid4().hex[:12]}"
    with scratch_database_url() as database_url:
        servers = []
        base_env = {**os.environ, "DATABASE_URL": database_url,
                    "CIRCUS_STORAGE_URL": storage_url, "CIRCUS_S3_CREATE_BUCKET": "1",
                    "CIRCUS_WORKER_POLL_INTERVAL": "0.1", "WEB_CONCURRENCY": "1",
                    # a killed worker's task is seen as interrupted within seconds
                    "CIRCUS_TASK_HEARTBEAT_SECONDS": "0.5", "CIRCUS_TASK_STALE_SECONDS": "4"}
        for name in ("a", "b"):
            folder = tmp / name
            folder.mkdir()
            servers.append(Server(folder, {**base_env, "CIRCUS_DATA_DIR": str(folder / "data")}))
        flask_cli(servers[0].env, "init-db")
        with shared_app(servers[0], tmp / "setup").app_context():
            group = make_group("downloaders", domains=["default"], privileges=["downloadVolume"])
            user = db.session.get(User, "circus@circus.example.com")
            user.groups = list(user.groups or []) + [group.group_id]
            db.session.commit()
            db.engine.dispose()
        token = flask_cli(servers[0].env, "add-permanent-token", "circus").strip().splitlines()[-1]
        try:
            for srv in servers:
                srv.token = token
                srv.start("gunicorn", [sys.executable, "-m", "gunicorn", "-b", srv.base[7:],
                                       "--no-control-socket", "app:create_app()"])
                srv.start("worker", [sys.executable, "-m", "flask", "--app", "app", "worker"])
            for srv in servers:
                srv.wait_until_up()
            yield servers
        finally:
            codes = [srv.stop() for srv in servers]
        assert codes == [{"gunicorn": 0, "worker": 0}] * 2, codes


def shared_app(srv, folder):
    """An app of this test process on the hosts' database and store (for set-up and checks
    the API does not offer)."""
    return create_app({"CIRCUS_DATA_DIR": str(folder), "DATABASE_URL": srv.env["DATABASE_URL"],
                       "STORAGE_URL": srv.env["CIRCUS_STORAGE_URL"],
                       "S3_ENDPOINT_URL": srv.env["CIRCUS_S3_ENDPOINT_URL"]})


def upload(srv, body, name="ct.zip"):
    res = srv.post("/api/series/domain/default", files=[("files", (name, body, "application/zip"))])
    assert res.status_code == 201, res.text
    return res.json()["taskId"]


def test_a_series_from_one_host_is_used_through_the_other(hosts, tmp_path):
    a, b = hosts
    task = wait_for_task(a, upload(a, head_first_zip()))
    assert task["status"] == "finished", task
    # searched and viewed through the other host, whose data folder never saw the files
    items = b.get("/api/series").json()["items"]
    assert len(items) == 1 and items[0]["images"] == "1-10"
    uid = items[0]["seriesUid"]
    assert not (b.tmp / "data" / "dicom" / uid).exists()
    meta = b.get(f"/rs/series/{uid}/metadata").json()
    assert meta["voxelCount"] == [320, 260, 10]
    res = requests.get(f"{b.base}/rs/series/{uid}/volume?token={b.token}", timeout=60)
    assert res.status_code == 200 and len(res.content) == 320 * 260 * 10 * 2
    # exported through one, downloaded through the other
    res = b.post("/api/series/export-cs-volume", json={"series": [
        {"seriesUid": uid, "partialVolumeDescriptor": {"start": 1, "end": 10, "delta": 1}}]})
    assert res.status_code == 201, res.text
    task_id = res.json()["taskId"]
    assert wait_for_task(b, task_id)["status"] == "finished"
    res = a.get(f"/api/tasks/{task_id}/download")
    assert res.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(res.content)) as tar:
        assert len(tar.extractfile("0.raw").read()) == 320 * 260 * 10 * 2
    # a plug-in job registered through one host, its results read through the other
    with RemotePlugin(delay=0.5) as plugin:
        body = remote_definition(endpoint=plugin.endpoint, secret="s3cret")
        assert a.post("/api/admin/plugins", json=body).status_code == 201
        plugin_id = a.get("/api/admin/plugins").json()["items"][-1]["pluginId"]
        with shared_app(a, tmp_path).app_context():
            grant("circus@circus.example.com", plugin_id)
            db.engine.dispose()
        res = b.post("/api/plugin-jobs", json={"pluginId": plugin_id, "series": [
            {"seriesUid": uid, "partialVolumeDescriptor": "auto"}]})
        assert res.status_code == 201, res.text
        job_id = res.json()["jobId"]
        for _ in range(300):
            job = a.get(f"/api/plugin-jobs/{job_id}").json()
            if job["status"] in ("finished", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "finished", (job, a.log("worker"), b.log("worker"))
    assert a.get(f"/api/plugin-jobs/{job_id}/attachment").json() == [
        "images", "images/summary.txt", "plugin-log.txt", "results.json"]
    res = b.get(f"/api/plugin-jobs/{job_id}/attachment/plugin-log.txt")
    assert res.status_code == 200 and b"Job execution done." in res.content


def test_every_task_is_claimed_once(hosts, tmp_path):
    a, b = hosts
    ids = [upload((a, b)[i % 2], head_first_zip(), f"ct{i}.zip") for i in range(8)]
    done = [wait_for_task(a, task_id) for task_id in ids]
    assert [t["status"] for t in done] == ["finished"] * 8, done
    with shared_app(a, tmp_path).app_context():
        claimed = [db.session.get(Task, task_id).claimed_by for task_id in ids]
        db.engine.dispose()
    # one claimant each (a second claim would have failed or re-run the task), and the
    # claims were shared by both workers
    assert all(claimed) and len(set(c.rsplit(":", 1)[0] for c in claimed)) >= 1
    assert len(set(claimed)) == 2, claimed


def test_a_worker_killed_mid_import_leaves_the_task_to_the_other(hosts, tmp_path):
    """SIGKILL the worker running an import: the task is failed as interrupted (the other
    host's listing notices the silent heartbeat), nothing of the archive is indexed, and
    the same upload then succeeds on the surviving worker."""
    a, b = hosts
    uid = "1.2.826.0.1.3680043.2.1125.99." + str(uuid.uuid4().int % 10**12)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for n in range(1, 1501):
            archive.writestr(f"{n}.dcm", dicom_bytes(series_uid=uid, instance=n, z=float(n)))
    body = out.getvalue()
    task_id = upload(a, body, "big.zip")
    app = shared_app(a, tmp_path)
    claimant = None
    with app.app_context():
        for _ in range(400):
            db.session.rollback()
            claimant = db.session.get(Task, task_id).claimed_by
            if claimant:
                break
            time.sleep(0.02)
        db.engine.dispose()
    assert claimant, "no worker claimed the task"
    pid = int(claimant.rsplit(":", 1)[1])
    victim = next(srv for srv in hosts if srv.processes["worker"].pid == pid)
    survivor = b if victim is a else a
    victim.processes["worker"].send_signal(signal.SIGKILL)
    victim.processes["worker"].wait()
    task = wait_for_task(survivor, task_id, seconds=60)
    assert task["status"] == "error", task
    assert task["errorMessage"] == "The task was interrupted because the worker running it " \
                                   "stopped."
    assert not [s for s in survivor.get("/api/series").json()["items"] if s["seriesUid"] == uid]
    # a worker for the victim's host again (the fixture stops it), then the retry
    victim.start("worker", [sys.executable, "-m", "flask", "--app", "app", "worker"])
    task = wait_for_task(survivor, upload(survivor, body, "big.zip"), seconds=120)
    assert task["status"] == "finished", task
    [series] = [s for s in victim.get("/api/series").json()["items"] if s["seriesUid"] == uid]
    assert series["images"] == "1-1500"
