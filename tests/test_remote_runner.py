"""Remote (CAD+remote) plug-ins end to end: a real loopback HTTP plug-in server, the real
worker, real DICOM files; every way a remote plug-in can misbehave; and the pieces of the
protocol (result archives, server-sent events, the multipart body)."""
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

import storage
import worker
from models import PluginJob, db
from plugins import remote_runner
from plugins.job_log import PluginRunError
from tests.plugin_helpers import grant, remote_definition, store_sample_series
from tests.remote_plugin_server import RemotePlugin

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def server():
    with RemotePlugin(delay=3.0) as plugin:
        yield plugin


@pytest.fixture
def env(app, client, tokens, auth_headers, dicom_dir, server):
    with app.app_context():
        uid = store_sample_series(dicom_dir / "head-first")
    return SimpleNamespace(series_uid=uid, app=app, client=client, headers=auth_headers,
                           data=Path(app.config["CIRCUS_DATA_DIR"]), server=server)


def register(env, **definition):
    """Register a remote plug-in pointing at the test server; bob may run it."""
    body = remote_definition(endpoint=env.server.endpoint, secret="s3cret", **definition)
    res = env.client.post("/api/admin/plugins", json=body, headers=env.headers["alice"])
    assert res.status_code == 201, res.get_json()
    items = env.client.get("/api/admin/plugins", headers=env.headers["alice"]).get_json()["items"]
    plugin_id = items[-1]["pluginId"]
    with env.app.app_context():
        grant("bob@example.com", plugin_id)
    return plugin_id


def snapshot(data_dir, job_id=None):
    """Every file under the data folder except the job's own folders and the database."""
    skip = {data_dir / "plugin-results" / str(job_id), data_dir / "work" / str(job_id)}
    found = set()
    for folder, _dirs, files in os.walk(data_dir):
        if any(Path(folder) == s or s in Path(folder).parents for s in skip):
            continue
        found |= {os.path.join(folder, f) for f in files if not f.startswith("circus.db")}
    return found


def run_job(env, plugin_id, **extra):
    """POST a job, run the worker until the queue is empty; return (job document, log)."""
    before = snapshot(env.data)
    res = env.client.post("/api/plugin-jobs", headers=env.headers["bob"], json={
        "pluginId": plugin_id, **extra,
        "series": [{"seriesUid": env.series_uid, "partialVolumeDescriptor": "auto"}]})
    assert res.status_code == 201, res.get_json()
    job_id = res.get_json()["jobId"]
    with env.app.app_context():
        worker.run_pending()
        assert db.session.get(PluginJob, job_id).queue_state is None
    job = env.client.get(f"/api/plugin-jobs/{job_id}", headers=env.headers["bob"]).get_json()
    log_path = env.data / "plugin-results" / job_id / "plugin-log.txt"
    assert not (env.data / "work" / job_id).exists()           # work folder removed
    assert snapshot(env.data, job_id) == before                  # nothing else touched
    return job, log_path.read_text()


def expected_mean(dicom_dir):
    slices = [pydicom.dcmread(p).pixel_array.astype(np.float64)
              for p in sorted((dicom_dir / "head-first").glob("*.dcm"))]
    return float(np.mean(slices))


def test_remote_plugin_runs_on_the_real_volume(env, dicom_dir):
    plugin_id = register(env)
    job, log = run_job(env, plugin_id)
    assert job["status"] == "finished", job["errorMessage"]
    assert job["errorMessage"] is None and job["finishedAt"] and job["startedAt"]
    candidate = job["results"]["results"]["lesionCandidates"][0]
    assert candidate["confidence"] == pytest.approx(expected_mean(dicom_dir), rel=1e-9)
    assert job["results"]["results"]["dimension"] == [320, 260, 10]
    # what the plug-in server received
    [request] = env.server.received
    assert request["headers"]["Authorization"] == "Bearer s3cret"
    assert sorted(request["files"]) == ["0.json", "0.mhd", "0.raw"]
    tags = json.loads(request["files"]["0.json"])
    assert "0010,0010" not in tags["common"] and "0010,0020" not in tags["common"]
    assert len(tags["unique"]) == 10
    assert "ElementDataFile = 0.raw" in request["files"]["0.mhd"].decode()
    # attachments and the log
    res = env.client.get(f"/api/plugin-jobs/{job['jobId']}/attachment", headers=env.headers["bob"])
    assert res.get_json() == ["images", "images/summary.txt", "plugin-log.txt", "results.json"]
    stored = env.data / "plugin-results" / job["jobId"] / "results.json"
    assert json.loads(stored.read_text()) == job["results"]
    assert not stored.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert "[Remote CAD] Loaded 0.raw" in log and "Job execution done." in log


def test_remote_secret_spelled_authentification(env):
    plugin_id = register(env, runConfiguration={"adapter": "defaultHttpAdapter", "parameters": {
        "endpoint": env.server.endpoint + "/", "authentification": "s3cret"}})
    job, _log = run_job(env, plugin_id)
    assert job["status"] == "finished", job["errorMessage"]


@pytest.mark.parametrize("mode", ["gzip", "no_finished"])
def test_remote_variants_that_succeed(env, mode):
    env.server.mode = mode
    job, _log = run_job(env, register(env))
    assert job["status"] == "finished", job["errorMessage"]
    assert job["results"]["results"]["lesionCandidates"][0]["rank"] == 1


@pytest.mark.parametrize("mode, message", [
    ("error_event", "Remote CAD failed: The lesion detector crashed"),
    ("http500", "Remote CAD failed: Failed to submit job"),
    ("no_request_id", "Remote CAD failed: Internal error: No X-Request-ID header in response"),
    ("result404", "Remote CAD failed: Failed to fetch result data"),
])
def test_remote_failures(env, mode, message):
    env.server.mode = mode
    job, log = run_job(env, register(env))
    assert job["status"] == "failed"
    assert job["errorMessage"] == message
    assert job["results"] is None and job["finishedAt"] is None
    assert f"Error: {message}" in log


def test_remote_plugin_that_times_out(env):
    env.server.mode = "timeout"
    plugin_id = register(env, runConfiguration={"adapter": "default", "parameters": {
        "endpoint": env.server.endpoint, "authentication": "s3cret", "timeout": 1}})
    job, _log = run_job(env, plugin_id)
    assert job["status"] == "failed"
    assert job["errorMessage"] == (
        "Remote CAD failed: Internal error: The plug-in server did not answer within 1 s.")


def test_remote_plugin_drops_the_connection_mid_stream(env):
    env.server.mode = "drop"
    job, log = run_job(env, register(env))
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("Remote CAD failed: Error reading server response: ")
    assert "[Remote CAD] Loaded 0.raw" in log


@pytest.mark.parametrize("mode, entry", [
    ("tar_traversal", "../../escaped.txt"),
    ("tar_absolute", "/tmp/circus-absolute-escape.txt"),
    ("tar_symlink", "images/passwd (not a regular file or folder)")])
def test_remote_result_archive_cannot_escape(env, mode, entry, tmp_path):
    env.server.mode = mode
    job, _log = run_job(env, register(env))
    assert job["status"] == "failed"
    assert job["errorMessage"] == f"Remote CAD failed: Unsafe entry in the result archive: {entry}"
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not os.path.exists("/tmp/circus-absolute-escape.txt")
    # nothing of the archive was extracted, so nothing was recorded either
    assert env.client.get(f"/api/plugin-jobs/{job['jobId']}/attachment",
                          headers=env.headers["bob"]).get_json() == ["plugin-log.txt"]


@pytest.mark.parametrize("mode", ["malformed", "invalid_results"])
def test_remote_plugin_with_bad_results_json(env, mode):
    env.server.mode = mode
    job, _log = run_job(env, register(env))
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("Plug-in validation failed: ")
    assert job["results"] is None


def test_remote_plugin_with_wrong_secret(env):
    env.server.secret = "another"
    job, _log = run_job(env, register(env))
    assert job["errorMessage"] == "Remote CAD failed: Failed to submit job"
    assert env.server.received == []


def test_remote_plugin_with_unknown_adapter(env):
    plugin_id = register(env, runConfiguration={"adapter": "magic", "parameters": {
        "endpoint": env.server.endpoint}})
    job, _log = run_job(env, plugin_id)
    assert job["errorMessage"] == "No such adapter: magic"


def test_remote_plugin_server_not_listening(env):
    endpoint = env.server.endpoint
    env.server.stop()
    plugin_id = register(env, runConfiguration={"adapter": "default", "parameters": {
        "endpoint": endpoint, "authentication": "s3cret"}})
    job, _log = run_job(env, plugin_id)
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("Remote CAD failed: Internal error: ")


def test_input_files_missing_at_run_time(env):
    plugin_id = register(env)
    with env.app.app_context():
        os.unlink(storage.instance_path(env.series_uid, 4))
    res = env.client.post("/api/plugin-jobs", headers=env.headers["bob"], json={
        "pluginId": plugin_id,
        "series": [{"seriesUid": env.series_uid, "partialVolumeDescriptor": "auto"}]})
    assert res.status_code == 400  # caught at registration already


# --- archives, SSE, multipart ---------------------------------------------------------------

def _tar(path, entries, mode="w"):
    with tarfile.open(path, mode) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extract_tar_accepts_relative_files_and_folders(tmp_path):
    folder = tarfile.TarInfo("./sub")
    folder.type = tarfile.DIRTYPE
    _tar(tmp_path / "a.tgz", [(folder, None), _file("./sub/x.txt", b"x"),
                              _file("results.json", b"{}")], mode="w:gz")
    remote_runner.extract_tar(str(tmp_path / "a.tgz"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "sub" / "x.txt").read_bytes() == b"x"
    assert (tmp_path / "out" / "results.json").read_bytes() == b"{}"


@pytest.mark.parametrize("kind", ["hardlink", "device", "fifo", "backslash", "dotdot"])
def test_extract_tar_refuses_unsafe_entries(tmp_path, kind):
    entries = [_file("results.json", b"{}")]
    if kind in ("hardlink", "device", "fifo"):
        info = tarfile.TarInfo("odd")
        info.type = {"hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE,
                     "fifo": tarfile.FIFOTYPE}[kind]
        info.linkname = "/etc/passwd"
        entries.append((info, None))
    else:
        entries.append(_file("..\\evil" if kind == "backslash" else "sub/../../evil"))
    _tar(tmp_path / "a.tar", entries)
    with pytest.raises(remote_runner.UnsafeArchiveError) as caught:
        remote_runner.extract_tar(str(tmp_path / "a.tar"), str(tmp_path / "out"))
    assert "Unsafe entry in the result archive" in str(caught.value)
    assert not (tmp_path / "out" / "results.json").exists()   # nothing written at all
    assert not list(tmp_path.rglob("evil"))


def test_extract_tar_of_garbage(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PluginRunError) as caught:
        remote_runner.extract_tar(str(tmp_path / "a.tar"), str(tmp_path / "out"))
    assert str(caught.value).startswith("Remote CAD failed: The result archive cannot be read")


def test_sse_events():
    stream = [b"event: log\r\ndata: \"one\"\r\n\r\n: comment\n", b"event: lo", b"g\ndata: line 1\n",
              b"data: line 2\n\nevent: finished\ndata: null\n\nevent: error\ndata:\"tail\""]
    assert list(remote_runner.sse_events(stream)) == [
        ("log", "one"), ("log", "line 1\nline 2"), ("finished", None), ("error", "tail")]


def test_multipart_body_length_is_exact(tmp_path):
    (tmp_path / "0.raw").write_bytes(os.urandom(3000))
    (tmp_path / "0.mhd").write_text("ObjectType = Image\n")
    body = remote_runner.MultipartBody([str(tmp_path / "0.mhd"), str(tmp_path / "0.raw")])
    data = b"".join(body)
    assert len(data) == len(body)
    assert data.count(b'name="files"; filename="0.raw"') == 1
    assert data.endswith(f"--{body.boundary}--\r\n".encode())
