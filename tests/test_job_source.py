"""plugins.job_source and plugins.runner: the worker source (concurrency, stopped manager, crash
recovery), input preparation, and the plug-in CLI commands."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

import storage
import worker
from models import PluginDefinition, PluginJob, db, utcnow
from plugins import job_source, jobs, runner
from tests.plugin_helpers import grant, remote_definition, store_sample_series
from tests.remote_plugin_server import RemotePlugin

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def server():
    with RemotePlugin() as plugin:
        yield plugin


@pytest.fixture
def env(app, client, tokens, auth_headers, dicom_dir, server):
    res = client.post("/api/admin/plugins", headers=auth_headers["alice"],
                      json=remote_definition(endpoint=server.endpoint, secret="s3cret"))
    assert res.status_code == 201
    with app.app_context():
        plugin_id = db.session.execute(sa.select(PluginDefinition.plugin_id)).scalar()
        grant("bob@example.com", plugin_id)
        uid = store_sample_series(dicom_dir / "head-first")
    return SimpleNamespace(app=app, client=client, headers=auth_headers, server=server,
                           plugin_id=plugin_id, series_uid=uid,
                           data=Path(app.config["CIRCUS_DATA_DIR"]))


def queue_jobs(env, count):
    ids = []
    for end in range(10, 10 - count, -1):
        res = env.client.post("/api/plugin-jobs", headers=env.headers["bob"], json={
            "pluginId": env.plugin_id, "series": [{"seriesUid": env.series_uid,
                                                   "partialVolumeDescriptor": {
                                                       "start": 1, "end": end, "delta": 1}}]})
        assert res.status_code == 201, res.get_json()
        ids.append(res.get_json()["jobId"])
    return ids


def statuses(env, ids):
    with env.app.app_context():
        return [db.session.get(PluginJob, i).status for i in ids]


# --- the worker source ----------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 3])
def test_jobs_run_concurrently_up_to_the_configured_number(env, concurrency):
    env.app.config["PLUGIN_JOB_CONCURRENCY"] = concurrency
    env.server.run_delay = 0.25
    ids = queue_jobs(env, 6)
    with env.app.app_context():
        worker.run_pending()
    assert statuses(env, ids) == ["finished"] * 6
    assert env.server.max_active == concurrency      # never more, and really that many


def test_a_job_process_that_dies_fails_its_jobs_and_is_replaced(env):
    env.app.config["PLUGIN_JOB_CONCURRENCY"] = 2
    env.server.run_delay = 1.0
    first, second, third = queue_jobs(env, 3)
    with env.app.app_context():
        assert job_source.run_plugin_jobs(env.app, "w1") is True  # two jobs, two processes
        pool = job_source.job_pool(env.app, "w1")
        assert sorted(pool.futures.values()) == sorted([first, second])
        deadline = time.monotonic() + 30
        while env.server.active < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.getpid() not in pool.executor._processes       # jobs run elsewhere
        os.kill(next(iter(pool.executor._processes)), signal.SIGKILL)
        while job_source.run_plugin_jobs(env.app, "w1"):
            pass
    # The pool of a dead process is broken as a whole: both its jobs end failed, at once,
    # and the next job runs in new processes.
    assert statuses(env, [first, second, third]) == ["failed", "failed", "finished"]
    with env.app.app_context():
        job = db.session.get(PluginJob, first)
        assert job.error_message == job_source.INTERRUPTED and job.queue_state is None
    assert job_source.INTERRUPTED in (
        env.data / "plugin-results" / second / "plugin-log.txt").read_text()
    assert not (env.data / "work" / first).exists()


def test_stopped_manager_finishes_the_current_job_and_takes_no_new_one(env):
    env.server.run_delay = 0.3
    first, second = queue_jobs(env, 2)
    with env.app.app_context():
        assert job_source.run_plugin_jobs(env.app, "w1") is True  # takes the first job
        assert statuses(env, [first, second]) == ["processing", "in_queue"]
        jobs.set_manager_status("stopped")
        while job_source.run_plugin_jobs(env.app, "w1"):
            pass
    assert statuses(env, [first, second]) == ["finished", "in_queue"]
    with env.app.app_context():
        jobs.set_manager_status("running")
        worker.run_pending()
    assert statuses(env, [first, second]) == ["finished", "finished"]


def _processing(env, job_id, claimed_by, started_at):
    with env.app.app_context():
        db.session.execute(sa.update(PluginJob).where(PluginJob.job_id == job_id).values(
            status="processing", queue_state="processing", claimed_by=claimed_by,
            started_at=started_at))
        db.session.commit()
        os.makedirs(storage.work_dir(job_id), exist_ok=True)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_jobs_of_a_crashed_worker_are_failed_on_restart(env):
    dead, fresh, stale, beating, own = queue_jobs(env, 5)
    now, old = utcnow(), utcnow() - timedelta(minutes=10)
    _processing(env, dead, f"{socket.gethostname()}:{_dead_pid()}", now)
    _processing(env, fresh, "other-host:1", now)        # just claimed elsewhere: alive
    _processing(env, stale, "other-host:2", old)        # no heartbeat for 10 minutes
    _processing(env, beating, "other-host:3", old)      # long job, fresh heartbeat
    _processing(env, own, "me:1", now)                  # this worker before its restart
    with env.app.app_context():
        job_source.beat("other-host:3")
        failed = job_source.recover_interrupted_jobs("me:1")
    assert sorted(failed) == sorted([dead, stale, own])
    assert statuses(env, [dead, fresh, stale, beating, own]) == [
        "failed", "processing", "failed", "processing", "failed"]
    with env.app.app_context():
        job = db.session.get(PluginJob, dead)
        assert job.error_message == job_source.INTERRUPTED and job.queue_state is None
    assert not (env.data / "work" / dead).exists() and (env.data / "work" / fresh).exists()
    log = (env.data / "plugin-results" / dead / "plugin-log.txt").read_text()
    assert job_source.INTERRUPTED in log


def test_worker_start_sweeps_interrupted_jobs(env):
    [job_id] = queue_jobs(env, 1)
    _processing(env, job_id, f"{socket.gethostname()}:{_dead_pid()}", utcnow())
    with env.app.app_context():
        worker.run_pending()
    assert statuses(env, [job_id]) == ["failed"]


def test_job_of_a_deleted_plugin_fails(env):
    [job_id] = queue_jobs(env, 1)
    with env.app.app_context():
        db.session.delete(db.session.get(PluginDefinition, env.plugin_id))
        db.session.commit()
        worker.run_pending()
        job = db.session.get(PluginJob, job_id)
        assert (job.status, job.error_message) == ("failed", f"No such plugin: {env.plugin_id}")


# --- input preparation ----------------------------------------------------------------------

def test_prepare_input_writes_read_only_volumes(env, tmp_path):
    in_dir = tmp_path / "in"
    series = [{"seriesUid": env.series_uid,
               "partialVolumeDescriptor": {"start": 2, "end": 8, "delta": 3}},
              {"seriesUid": env.series_uid,
               "partialVolumeDescriptor": {"start": 10, "end": 1, "delta": -1}}]
    with env.app.app_context(), runner.JobLog(str(tmp_path / "log.txt")) as job_log:
        runner.prepare_input(series, str(in_dir), job_log)
    assert sorted(os.listdir(in_dir)) == ["0.json", "0.mhd", "0.raw", "1.json", "1.mhd", "1.raw"]
    assert "DimSize = 320 260 3\n" in (in_dir / "0.mhd").read_text()
    assert (in_dir / "1.raw").stat().st_size == 320 * 260 * 10 * 2
    assert not (in_dir / "0.raw").stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert "Preparing volume #1" in (tmp_path / "log.txt").read_text()


def test_prepare_input_with_a_missing_file(env, tmp_path):
    with env.app.app_context():
        os.unlink(storage.instance_path(env.series_uid, 5))
        with runner.JobLog(str(tmp_path / "log.txt")) as job_log:
            with pytest.raises(runner.PluginRunError) as caught:
                runner.prepare_input([{"seriesUid": env.series_uid,
                                               "partialVolumeDescriptor": {
                                                   "start": 1, "end": 10, "delta": 1}}],
                                             str(tmp_path / "in"), job_log)
    assert env.series_uid in str(caught.value)
    assert not list((tmp_path / "in").glob("0.*"))


# --- CLI --------------------------------------------------------------------------------------

def test_register_plugin_job_command(env):
    cli = env.app.test_cli_runner()
    result = cli.invoke(args=["register-plugin-job", "Remote CAD", "--user=bob",
                                 "--priority=7", f"{env.series_uid}:1:5:1"])
    assert result.exit_code == 0, result.output
    job_id = result.output.strip()
    with env.app.app_context():
        job = db.session.get(PluginJob, job_id)
        assert (job.user_email, job.priority, job.status) == ("bob@example.com", 7, "in_queue")
        assert job.series[0]["partialVolumeDescriptor"] == {"start": 1, "end": 5, "delta": 1}
    result = cli.invoke(args=["register-plugin-job", env.plugin_id, "--user=bob@example.com",
                                 env.series_uid])
    assert result.exit_code == 0, result.output
    with env.app.app_context():
        job = db.session.get(PluginJob, result.output.strip())
        assert job.series[0]["partialVolumeDescriptor"] == {"start": 1, "end": 10, "delta": 1}


@pytest.mark.parametrize("args, message", [
    (["Remote CAD", "--user=nobody", "UID"], "Specified user does not exist."),
    (["Unknown CAD", "--user=bob", "UID"], "Specified plugin does not exist."),
    (["Remote CAD", "--user=guest", "UID"],
     'You do not have "executePlugin" privilege of this plugin.'),
    (["Remote CAD", "--user=bob", "UID:1:2"], "Expected SERIES or SERIES:start:end:delta"),
    (["Remote CAD", "--user=bob", "UID:1:20:1"], "Specified range is invalid."),
])
def test_register_plugin_job_command_errors(env, args, message):
    args = [a.replace("UID", env.series_uid) for a in args]
    result = env.app.test_cli_runner().invoke(args=["register-plugin-job", *args])
    assert result.exit_code != 0 and message in result.output
    with env.app.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(PluginJob)).scalar() == 0


def test_run_plugin_command(env, tmp_path):
    out = tmp_path / "cli-out"
    result = env.app.test_cli_runner().invoke(args=[
        "run-plugin", env.plugin_id, env.series_uid, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Finished: 1 lesion candidate(s)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["images", "plugin-log.txt", "results.json"]
    assert json.loads((out / "results.json").read_text())["results"]["dimension"] == [320, 260, 10]
    assert list((env.data / "work").iterdir()) == []          # work folder removed
    with env.app.app_context():                                 # and no job was queued
        assert db.session.execute(sa.select(sa.func.count()).select_from(PluginJob)).scalar() == 0


def test_run_plugin_command_failure(env, tmp_path):
    env.server.mode = "error_event"
    out = tmp_path / "cli-out"
    result = env.app.test_cli_runner().invoke(args=[
        "run-plugin", env.plugin_id, f"{env.series_uid}:1:3:1", "--out", str(out), "--keep"])
    assert result.exit_code != 0
    assert "Remote CAD failed: The lesion detector crashed" in result.output
    assert "Error: Remote CAD failed" in (out / "plugin-log.txt").read_text()
    result = env.app.test_cli_runner().invoke(args=[
        "run-plugin", "f" * 64, env.series_uid, "--out", str(out)])
    assert "The requested plugin/remotePlugin was not found." in result.output
