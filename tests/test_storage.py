"""The storage backends (``storage.py``): the data directory (``file://``) and an S3 store.

Every test of the ``store`` fixture runs on both; the S3 ones need a real S3-compatible
store (``../shared/tools/s3-throwaway.sh start`` prints its settings: CIRCUS_S3_ENDPOINT_URL
and the AWS variables) and skip without one. Each S3 test gets a prefix of its own in the
bucket ``circus-test``. Uploads go through the API, the spool and the real worker; reads
through /rs, exports and downloads; faults through a real TCP proxy that is cut mid-upload,
and wrong credentials against a gateway that checks them (s3_gateway.py).
"""
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile

import pytest
import requests

import storage
import tasks
import worker
from app import create_app
from dicom import batch, importer
from models import Instance, Series, Task, db, new_ulid
from tests import s3_gateway
from tests.plugin_helpers import grant, remote_definition
from tests.remote_plugin_server import RemotePlugin
from tests.test_e2e import ROOT, flask_cli, free_port, process_env

pytestmark = [pytest.mark.storage, pytest.mark.filterwarnings("ignore::UserWarning")]

BUCKET = "circus-test"
ENDPOINT = os.environ.get("CIRCUS_S3_ENDPOINT_URL")
# CI's third run sets CIRCUS_REQUIRE_S3=1: there a missing store is a failure, not a skip.
REQUIRED = os.environ.get("CIRCUS_REQUIRE_S3") == "1"
NEEDS_S3 = pytest.mark.skipif(
    not ENDPOINT and not REQUIRED, reason="no S3 store: start one with ../shared/tools/s3-throwaway.sh start "
                         "and export what it prints (CIRCUS_S3_ENDPOINT_URL, AWS_*)")


def s3_config(prefix=None, endpoint=None, bucket=BUCKET, create=True):
    return {"STORAGE_URL": f"s3://{bucket}/{prefix or 't-' + uuid.uuid4().hex[:12]}",
            "S3_ENDPOINT_URL": endpoint or ENDPOINT, "S3_CREATE_BUCKET": create}


def credentials(monkeypatch, key=s3_gateway.ACCESS_KEY, secret=s3_gateway.SECRET_KEY):
    """Set the AWS credential variables the stores built next will use."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(params=["file", pytest.param("s3", marks=NEEDS_S3)])
def app_config(request):
    return {} if request.param == "file" else s3_config()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


def test_s3_store_is_configured_when_required():
    if REQUIRED:
        assert ENDPOINT, "CIRCUS_REQUIRE_S3=1 but CIRCUS_S3_ENDPOINT_URL is not set"


def stored_keys(prefix):
    return sorted(key for key, _size, _mtime in storage.store().list(prefix))


def upload(client, headers, files, before_worker=None):
    """POST files to the default domain, run the worker; return the task row as JSON."""
    data = {"files": [(io.BytesIO(body), name) for name, body in files]}
    res = client.post("/api/series/domain/default", data=data, headers=headers,
                      content_type="multipart/form-data")
    assert res.status_code == 201, res.get_json()
    task_id = res.get_json()["taskId"]
    if before_worker is not None:
        before_worker()
    worker.run_pending()
    return db.session.get(Task, task_id).to_json()


def head_first_zip(dicom_dir):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted((dicom_dir / "head-first").glob("*.dcm")):
            archive.write(path, path.name)
    return out.getvalue()


def series_uid_of(client, headers):
    items = client.get("/api/series", headers=headers).get_json()["items"]
    assert len(items) == 1
    return items[0]["seriesUid"]


def test_upload_view_export_delete(ctx, client, auth_headers, dicom_dir):
    alice = auth_headers["alice"]
    task = upload(client, alice, [("ct.zip", head_first_zip(dicom_dir))])
    assert task["status"] == "finished", task
    uid = series_uid_of(client, alice)
    assert stored_keys(storage.series_key(uid)) == [
        storage.instance_key(uid, n) for n in range(1, 11)]
    # /rs reads every slice
    res = client.get(f"/rs/series/{uid}/metadata")
    assert res.status_code == 200 and res.get_json()["voxelCount"] == [320, 260, 10]
    token = alice["Authorization"].split()[1]
    res = client.get(f"/rs/series/{uid}/volume?token={token}")
    assert res.status_code == 200 and len(res.data) == 320 * 260 * 10 * 2
    # an export becomes a download object, streamed back
    res = client.post("/api/series/export-cs-volume", headers=alice, json={"series": [
        {"seriesUid": uid, "partialVolumeDescriptor": {"start": 1, "end": 10, "delta": 1}}]})
    assert res.status_code == 201, res.get_json()
    task_id = res.get_json()["taskId"]
    worker.run_pending()
    assert db.session.get(Task, task_id).status == "finished"
    assert stored_keys("downloads/") == [storage.download_key(task_id)]
    res = client.get(f"/api/tasks/{task_id}/download", headers=alice)
    assert res.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(res.data)) as tar:
        raw = tar.extractfile("0.raw").read()
    assert len(raw) == 320 * 260 * 10 * 2
    # dismissing deletes the download; deleting the series deletes its objects
    assert client.patch(f"/api/tasks/{task_id}", json={"dismissed": True},
                        headers=alice).status_code in (200, 204)
    assert stored_keys("downloads/") == []
    assert client.delete(f"/api/series/{uid}", headers=alice).status_code == 204
    assert stored_keys("dicom/") == []
    assert client.get(f"/rs/series/{uid}/metadata").status_code == 404


def test_blobs_round_trip(ctx, client, auth_headers):
    import hashlib
    body = os.urandom(100_000)
    sha1 = hashlib.sha1(body).hexdigest()
    headers = {**auth_headers["alice"], "Content-Type": "application/octet-stream"}
    assert client.put(f"/api/blob/{sha1}", data=body, headers=headers).status_code == 201
    assert stored_keys("blobs/") == [storage.blob_key(sha1)]
    res = client.get(f"/api/blob/{sha1}", headers=auth_headers["alice"])
    assert res.status_code == 200 and res.data == body
    # a body that does not match its hash leaves nothing stored
    wrong = "0" * 40
    res = client.put(f"/api/blob/{wrong}", data=b"xyz", headers=headers)
    assert res.status_code == 400 and res.get_json() == {"error": "Hash mismatch."}
    assert stored_keys("blobs/") == [storage.blob_key(sha1)]
    assert client.get(f"/api/blob/{wrong}", headers=auth_headers["alice"]).status_code == 404


def test_plugin_results_are_stored_and_served(ctx, client, auth_headers):
    job_id = "01J0000000000000000000TEST"
    folder = storage.results_dir(job_id)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as fh:
        fh.write('{"results": {}}')
    with open(os.path.join(folder, "sub", "image.png"), "wb") as fh:
        fh.write(b"\x89PNG")
    storage.publish_results(job_id)
    from plugins import jobs
    assert jobs.attachment_list(job_id) == ["results.json", "sub", "sub/image.png"]
    with open(jobs.attachment_path(job_id, "sub/image.png"), "rb") as fh:
        assert fh.read() == b"\x89PNG"
    with pytest.raises(Exception) as raised:
        jobs.attachment_path(job_id, "missing.txt")
    assert raised.value.status == 404


def test_sweep_removes_objects_without_rows_only(ctx, client, auth_headers, dicom_dir):
    alice = auth_headers["alice"]
    assert upload(client, alice, [("ct.zip", head_first_zip(dicom_dir))])["status"] == "finished"
    uid = series_uid_of(client, alice)
    # an orphan in a known series and one of a series that has no row at all
    for key in (storage.instance_key(uid, 99), storage.instance_key("1.2.3.999", 1)):
        with storage.published_file(key) as fh:
            fh.write(b"not indexed")
    assert batch.sweep_orphans(3600) == 0  # young: may belong to an import committing now
    assert batch.sweep_orphans(3600, now=time.time() + 7200) == 2
    assert stored_keys("dicom/") == [storage.instance_key(uid, n) for n in range(1, 11)]
    assert client.get(f"/rs/series/{uid}/metadata").status_code == 200


def test_import_killed_before_its_commit_is_swept(ctx, client, auth_headers, dicom_dir,
                                                  monkeypatch):
    """An import that dies after placing its files and before its commit (its clean-up
    never runs, as when the process is killed) leaves objects without rows; the sweep
    removes them and a new upload of the same files works."""
    class Killed(BaseException):
        pass

    def killed_commit():
        raise Killed()
    monkeypatch.setattr(batch.ImportBatch, "_remove_new", staticmethod(lambda *a: None))
    monkeypatch.setattr(batch.db.session, "commit", killed_commit)
    with pytest.raises(Killed):
        with batch.ImportBatch("default") as import_batch:
            for path in sorted((dicom_dir / "head-first").glob("*.dcm")):
                import_batch.add_file(str(path))
            import_batch.commit()
    monkeypatch.undo()
    db.session.rollback()
    assert db.session.query(Series).count() == 0 and db.session.query(Instance).count() == 0
    assert len(stored_keys("dicom/")) == 10
    assert batch.sweep_orphans(0, now=time.time() + 5) == 10
    assert stored_keys("dicom/") == []
    task = upload(client, auth_headers["alice"], [("ct.zip", head_first_zip(dicom_dir))])
    assert task["status"] == "finished" and len(stored_keys("dicom/")) == 10


def test_sweep_removes_the_files_of_ended_uploads_only(ctx):
    """An upload's stored files outlive its import when the store failed as it ended, or
    when no task row was made; the sweep removes them, never those of a waiting import."""
    def spooled(task_id, status=None):
        os.makedirs(storage.spool_dir(task_id))
        with open(os.path.join(storage.spool_dir(task_id), "000001"), "wb") as fh:
            fh.write(b"upload")
        storage.share_spool(task_id)
        if status is not None:
            task = tasks.create_task("alice@example.com", importer.TASK_NAME, "series_import")
            task.task_id, task.status = task_id, status
            db.session.commit()
        return task_id
    for status in ("finished", "error", None):
        spooled(new_ulid(), status)
    waiting = spooled(new_ulid(), "processing")
    assert len(stored_keys("spool/")) == 4
    assert importer.sweep_spools(3600) == 0  # young: may belong to a request not committed yet
    assert importer.sweep_spools(3600, now=time.time() + 7200) == 3
    assert stored_keys("spool/") == [f"spool/{waiting}/000001"]


@pytest.mark.parametrize("key", ["dicom/../x", "../dicom/x", "/dicom/x", "dicom//x", "dicom/./x",
                                 "dicom/a\\..\\b", "dicom/x\x00", "work/x", "", "dicom"])
def test_keys_that_would_leave_the_prefix_are_refused(ctx, key):
    with pytest.raises(storage.UnsafePathError):
        storage.store().fetch(key)
    with pytest.raises(storage.UnsafePathError):
        with storage.published_file(key) as fh:
            fh.write(b"x")


def test_unsafe_ids_never_become_keys(ctx):
    for bad in ("../1", "1.2/../../3", "1..2"):
        with pytest.raises(storage.UnsafePathError):
            storage.instance_key(bad, 1)
    with pytest.raises(storage.UnsafePathError):
        storage.download_key("../../etc")


# --- settings and faults (S3) ------------------------------------------------------------------

@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "s3://ok-bucket/a/../b", "ftp://x/y",
                                 "file:///somewhere/else"])
def test_bad_storage_urls_stop_the_start(tmp_path, url):
    with pytest.raises(storage.StorageConfigError):
        create_app({"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path), "STORAGE_URL": url})


def test_wrong_endpoint_stops_the_start(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = {"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path), **s3_config(endpoint=endpoint)}
    credentials(monkeypatch)
    with pytest.raises(storage.StorageConfigError, match="cannot be reached"):
        create_app(config)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageConfigError, match=re.escape(
            "No credentials for the object store s3://circus-test/")):
        create_app(config)


@NEEDS_S3
def test_missing_bucket_is_refused_or_created(tmp_path):
    bucket = "circus-missing-" + uuid.uuid4().hex[:8]
    config = {"TESTING": True, "CIRCUS_DATA_DIR": str(tmp_path)}
    with pytest.raises(storage.StorageConfigError, match="does not exist.*CIRCUS_S3_CREATE_BUCKET"):
        create_app({**config, **s3_config(bucket=bucket, create=False)})
    app = create_app({**config, **s3_config(bucket=bucket, create=True)})
    with app.app_context():
        assert storage.store().bucket == bucket
        storage.store().client.delete_bucket(Bucket=bucket)


class CuttableProxy:
    """A TCP proxy to the store that can be cut: every connection is closed and new ones
    are refused, as when the store's host goes away."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.cut_after = None  # bytes client -> store after which the link is cut
        self.sent = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, target, outgoing):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if outgoing:
                    with self.lock:
                        self.sent += len(data)
                        over = self.cut_after is not None and self.sent > self.cut_after
                    if over:
                        self.cut()
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def use_store(app, prefix, proxy=None):
    """Switch ``app`` to the S3 store at ``prefix`` of the test bucket, through ``proxy``
    (a CuttableProxy) when given, else directly."""
    app.extensions.pop("circus.store", None)
    app.config.update(s3_config(prefix=prefix, endpoint=proxy and
                                f"http://127.0.0.1:{proxy.port}"))
    storage.init_app(app)


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{}])
def test_store_going_away_mid_upload_fails_the_task_cleanly(tmp_path, client, auth_headers,
                                                           dicom_dir, app):
    """The store vanishes during an import: the task fails saying so, nothing is indexed,
    what it left is swept, and the same upload works once the store is back."""
    proxy = CuttableProxy(int(ENDPOINT.rsplit(":", 1)[1]))
    prefix = "t-" + uuid.uuid4().hex[:12]
    with app.app_context():
        use_store(app, prefix, proxy)

        def cut_soon():  # the worker's uploads: a part of the ten files' 1.7 MB
            proxy.cut_after = proxy.sent + 600_000
        task = upload(client, auth_headers["alice"], [("ct.zip", head_first_zip(dicom_dir))],
                      before_worker=cut_soon)
        assert task["status"] == "error"
        assert task["errorMessage"].startswith("The files could not be stored: The object "
                                               "store failed"), task["errorMessage"]
        assert db.session.query(Series).count() == 0 and db.session.query(Instance).count() == 0
        # an upload while the store is away is refused at once, with a clear error
        res = client.post("/api/series/domain/default", headers=auth_headers["alice"],
                          data={"files": [(io.BytesIO(head_first_zip(dicom_dir)), "ct.zip")]},
                          content_type="multipart/form-data")
        assert res.status_code == 503 and res.get_json() == {
            "error": "The file storage is not available; try again later."}
        # the store is back (the same bucket and prefix, reached directly)
        use_store(app, prefix)
        # what the failed import could not remove (the upload's files, objects placed before
        # the cut) is swept
        assert stored_keys("spool/") != []
        batch.sweep_orphans(0, now=time.time() + 5)
        importer.sweep_spools(0, now=time.time() + 5)
        assert stored_keys("spool/") == [] and stored_keys("dicom/") == []
        task = upload(client, auth_headers["alice"], [("ct.zip", head_first_zip(dicom_dir))])
        assert task["status"] == "finished", task
        assert len(stored_keys("dicom/")) == 10


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{}])
def test_store_going_away_mid_export_fails_the_task_cleanly(client, auth_headers, dicom_dir,
                                                           app):
    """The store vanishes while an export publishes its archive: the task fails saying so,
    no download is offered or stored, and the same export works once the store is back."""
    alice = auth_headers["alice"]
    proxy = CuttableProxy(int(ENDPOINT.rsplit(":", 1)[1]))
    prefix = "t-" + uuid.uuid4().hex[:12]
    export = {"series": [{"seriesUid": None, "partialVolumeDescriptor": {
        "start": 1, "end": 10, "delta": 1}}]}
    with app.app_context():
        use_store(app, prefix, proxy)
        assert upload(client, alice, [("ct.zip", head_first_zip(dicom_dir))])[
            "status"] == "finished"
        export["series"][0]["seriesUid"] = series_uid_of(client, alice)
        for cut in (True, False):
            if not cut:  # the store is back
                use_store(app, prefix)
            res = client.post("/api/series/export-cs-volume", headers=alice, json=export)
            assert res.status_code == 201, res.get_json()
            task_id = res.get_json()["taskId"]
            proxy.cut_after = proxy.sent + 300_000  # a part of the 0.9 MB archive
            worker.run_pending()
            db.session.expire_all()
            task = db.session.get(Task, task_id).to_json()
            download = client.get(f"/api/tasks/{task_id}/download", headers=alice)
            if cut:
                assert task["status"] == "error", task
                assert task["errorMessage"].startswith(
                    "The download file could not be stored: The object store failed"), task
                assert download.status_code == 409 and download.get_json() == {
                    "error": "This task has not been completed."}
            else:
                assert task["status"] == "finished", task
                assert download.status_code == 200
                with tarfile.open(fileobj=io.BytesIO(download.data)) as tar:
                    assert len(tar.extractfile("0.raw").read()) == 320 * 260 * 10 * 2
        assert stored_keys("downloads/") == [storage.download_key(task_id)]


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{}])
def test_store_going_away_as_results_are_stored_fails_the_job(client, auth_headers, dicom_dir,
                                                              app, monkeypatch):
    """The store vanishes while a plug-in job stores its results: the job fails saying so,
    never finished with results that are not all stored."""
    proxy = CuttableProxy(int(ENDPOINT.rsplit(":", 1)[1]))
    publish_results = storage.publish_results

    def cut_midway(job_id, *args, **kwargs):  # the store goes away after a few hundred bytes
        proxy.cut_after = proxy.sent + 300
        publish_results(job_id, *args, **kwargs)
    with RemotePlugin(delay=0.5) as plugin, app.app_context():
        use_store(app, "t-" + uuid.uuid4().hex[:12], proxy)
        assert upload(client, auth_headers["alice"], [("ct.zip", head_first_zip(dicom_dir))])[
            "status"] == "finished"
        res = client.post("/api/admin/plugins", headers=auth_headers["alice"], json=(
            remote_definition(endpoint=plugin.endpoint, secret="s3cret")))
        assert res.status_code == 201, res.get_json()
        plugin_id = client.get("/api/admin/plugins", headers=auth_headers["alice"]).get_json()[
            "items"][-1]["pluginId"]
        grant("alice@example.com", plugin_id)
        res = client.post("/api/plugin-jobs", headers=auth_headers["alice"], json={
            "pluginId": plugin_id, "series": [{"seriesUid": series_uid_of(
                client, auth_headers["alice"]), "partialVolumeDescriptor": "auto"}]})
        assert res.status_code == 201, res.get_json()
        job_id = res.get_json()["jobId"]
        monkeypatch.setattr(storage, "publish_results", cut_midway)
        worker.run_pending()
        job = client.get(f"/api/plugin-jobs/{job_id}", headers=auth_headers["alice"]).get_json()
        assert job["status"] == "failed", job
        assert job["errorMessage"].startswith("The file storage failed: The object store "
                                              "failed"), job["errorMessage"]
        assert job["results"] is None


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{}])
def test_migrate_storage_copies_resumes_and_verifies(ctx, client, auth_headers, dicom_dir):
    import hashlib
    alice = auth_headers["alice"]
    assert upload(client, alice, [("ct.zip", head_first_zip(dicom_dir))])["status"] == "finished"
    blob = b"label bits" * 100
    sha1 = hashlib.sha1(blob).hexdigest()
    client.put(f"/api/blob/{sha1}", data=blob,
               headers={**alice, "Content-Type": "application/octet-stream"})
    url = s3_config()["STORAGE_URL"]
    runner = ctx.test_cli_runner()
    env = {"CIRCUS_S3_ENDPOINT_URL": ENDPOINT}
    ctx.config["S3_ENDPOINT_URL"] = ENDPOINT
    result = runner.invoke(args=["migrate-storage", "--to", url, "--create-bucket"], env=env)
    assert result.exit_code == 0, result.output
    assert "11 objects" in result.output and "sizes verified; skipped 0" in result.output
    target = storage.open_store(url, ctx.config["CIRCUS_DATA_DIR"], ctx.config)
    source_keys = stored_keys("dicom/") + stored_keys("blobs/")
    assert sorted(k for k, _s, _m in target.list("dicom/")) + \
        sorted(k for k, _s, _m in target.list("blobs/")) == source_keys
    # one object lost (an interrupted run): the next run copies only it
    target.delete(storage.instance_key(series_uid_of(client, alice), 3))
    result = runner.invoke(args=["migrate-storage", "--to", url], env=env)
    assert result.exit_code == 0, result.output
    assert "Copied 1 objects" in result.output and "skipped 10 already there" in result.output
    # the data served from the new store is the same
    app = create_app({"TESTING": True, "CIRCUS_DATA_DIR": ctx.config["CIRCUS_DATA_DIR"],
                      "DATABASE_URL": ctx.config.get("DATABASE_URL"),
                      **s3_config(prefix=url.split("/", 3)[3])})
    with app.app_context():
        res = app.test_client().get(f"/api/blob/{sha1}", headers=alice)
        assert res.status_code == 200 and res.data == blob
        uid = app.test_client().get("/api/series", headers=alice).get_json()["items"][0][
            "seriesUid"]
        assert app.test_client().get(f"/rs/series/{uid}/metadata").status_code == 200


def test_migrate_storage_refuses_a_bad_target(ctx):
    result = ctx.test_cli_runner().invoke(args=["migrate-storage", "--to", "s3://x"])
    assert result.exit_code != 0 and "CIRCUS_STORAGE_URL must be" in result.output


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{**s3_config(), "OBJECT_CACHE_BYTES": 400_000}]
                         if ENDPOINT else [{}])
def test_object_cache_stays_within_its_size(ctx, client, auth_headers, dicom_dir):
    """Reads go through cache/objects/, which keeps at most its size (least recently used
    out); a replaced object is fetched afresh (the cache is keyed by its ETag)."""
    alice = auth_headers["alice"]
    assert upload(client, alice, [("ct.zip", head_first_zip(dicom_dir))])["status"] == "finished"
    uid = series_uid_of(client, alice)
    token = alice["Authorization"].split()[1]
    res = client.get(f"/rs/series/{uid}/volume?token={token}")
    assert res.status_code == 200 and len(res.data) == 320 * 260 * 10 * 2
    cache = storage.object_cache_dir()

    def cached():
        return [os.path.join(d, f) for d, _s, files in os.walk(cache) for f in files]
    assert len(cached()) == 10  # all just used: none dropped under a reader
    for n, path in enumerate(sorted(cached())):  # later: slice 1 the least recently used
        os.utime(path, (time.time() - 3600 + n, time.time() - 3600 + n))
    storage.store().cache.evict()
    left = cached()
    assert sum(os.path.getsize(p) for p in left) <= 400_000 and len(left) < 10
    assert max(left) == max(cached()) and storage.instance_key(uid, 1) + "." not in \
        "".join(left)
    key = storage.instance_key(uid, 1)
    with open(storage.instance_path(uid, 1), "rb") as fh:
        first = fh.read()
    with storage.published_file(key) as fh:
        fh.write(b"replaced")
    with open(storage.instance_path(uid, 1), "rb") as fh:
        assert fh.read() == b"replaced" != first


def test_dicomweb_stow_and_wado_through_the_store(ctx, client, auth_headers, dicom_dir):
    """STOW-RS imports through the batch into the store; WADO-RS streams the stored files."""
    from tests.test_dicomweb import STOW_TYPE, parts_of, related
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    res = client.post("/dicom-web/studies", headers=auth_headers["alice"], content_type=STOW_TYPE,
                      data=related(*(p.read_bytes() for p in paths)))
    assert res.status_code == 200, res.get_data()
    uid = series_uid_of(client, auth_headers["alice"])
    assert len(stored_keys(storage.series_key(uid))) == 10
    study = client.get("/api/series", headers=auth_headers["alice"]).get_json()[
        "items"][0]["studyUid"]
    res = client.get(f"/dicom-web/studies/{study}/series/{uid}", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert [content for _head, content in parts_of(res)] == [p.read_bytes() for p in paths]


def assert_start_refused(env, message):
    """``flask init-db``, the worker and gunicorn each exit non-zero at start with ``message``
    alone (no traceback); gunicorn answers no request before it exits."""
    for args in (["init-db"], ["worker"]):
        done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode != 0 and message in output, (args, output[-3000:])
        assert "Traceback" not in output, output[-3000:]
    base = f"http://127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile()
    gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-b", base[7:],
                                 "--no-control-socket", "app:create_app()"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    answered = []
    deadline = time.monotonic() + 120
    while gunicorn.poll() is None and time.monotonic() < deadline:
        try:  # the store is refused before anything listens: nothing may answer
            answered.append(requests.get(base + "/api/status", timeout=1).status_code)
        except requests.RequestException:
            time.sleep(0.1)
    if gunicorn.poll() is None:
        gunicorn.kill()
        gunicorn.wait()
    log.seek(0)
    output = log.read().decode(errors="replace")
    assert gunicorn.returncode == 4 and "App failed to load" in output, \
        (gunicorn.returncode, output[-3000:])
    assert message in output and "Traceback" not in output, output[-3000:]
    assert answered == [], (answered, output[-3000:])


def test_servers_with_an_unreachable_store_do_not_start(tmp_path):
    """gunicorn, the worker and the CLI exit at start, saying why, instead of serving half."""
    env = process_env(tmp_path / "data", None, CIRCUS_STORAGE_URL="s3://circus-test/x",
                      CIRCUS_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
                      AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                      AWS_DEFAULT_REGION="us-east-1")
    assert_start_refused(env, "cannot be reached")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The endpoint of an S3 gateway that checks credentials (s3_gateway.py: its keys are
    ACCESS_KEY and SECRET_KEY), over the throwaway store."""
    try:
        with s3_gateway.credentialed_gateway(tmp_path_factory.mktemp("gateway")) as endpoint:
            yield endpoint
    except s3_gateway.GatewayUnavailable as exc:
        if REQUIRED:
            pytest.fail(f"CIRCUS_REQUIRE_S3=1 but {exc}")
        pytest.skip(str(exc))


@NEEDS_S3
@pytest.mark.parametrize("app_config", [{}])
def test_wrong_credentials_stop_the_start_and_right_ones_store(app, client, auth_headers,
                                                              dicom_dir, gateway, monkeypatch):
    """A store that checks credentials: a wrong secret or an unknown key stops the app's
    start naming the culprit; the right keys start it and uploads are stored."""
    config = {"TESTING": True, "CIRCUS_DATA_DIR": app.config["CIRCUS_DATA_DIR"],
              **s3_config(endpoint=gateway)}
    credentials(monkeypatch, secret="not-the-secret")
    with pytest.raises(storage.StorageConfigError, match=re.escape(
            "refused the credentials (SignatureDoesNotMatch): the secret key "
            "(AWS_SECRET_ACCESS_KEY) does not match the access key 'circus-test'")):
        create_app(config)
    credentials(monkeypatch, key="nobody")
    with pytest.raises(storage.StorageConfigError, match=re.escape(
            "refused the credentials (InvalidAccessKeyId): the access key 'nobody' "
            "(AWS_ACCESS_KEY_ID) is unknown to the store")):
        create_app(config)
    credentials(monkeypatch)
    app.extensions.pop("circus.store")
    app.config.update(s3_config(endpoint=gateway))
    with app.app_context():
        storage.init_app(app)
        task = upload(client, auth_headers["alice"], [("ct.zip", head_first_zip(dicom_dir))])
        assert task["status"] == "finished", task
        uid = series_uid_of(client, auth_headers["alice"])
        assert stored_keys(storage.series_key(uid)) == [
            storage.instance_key(uid, n) for n in range(1, 11)]
        assert client.get(f"/rs/series/{uid}/metadata").status_code == 200


@NEEDS_S3
def test_servers_with_wrong_credentials_do_not_start(tmp_path, gateway):
    """With the right keys ``init-db`` works; with a wrong secret gunicorn, the worker and the
    CLI exit at start naming the credentials problem, and nothing is served."""
    env = process_env(tmp_path / "data", None,
                      CIRCUS_STORAGE_URL=f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}",
                      CIRCUS_S3_ENDPOINT_URL=gateway, CIRCUS_S3_CREATE_BUCKET="1",
                      AWS_ACCESS_KEY_ID=s3_gateway.ACCESS_KEY,
                      AWS_SECRET_ACCESS_KEY=s3_gateway.SECRET_KEY,
                      AWS_DEFAULT_REGION="us-east-1")
    assert "Schema: created" in flask_cli(env, "init-db")
    assert_start_refused({**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                         "refused the credentials (SignatureDoesNotMatch): the secret key "
                         "(AWS_SECRET_ACCESS_KEY) does not match the access key 'circus-test'")
