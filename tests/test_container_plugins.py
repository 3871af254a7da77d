"""CAD plug-ins in a real container engine (podman or docker, see tests/container_engine.py):
register-cad-plugin, jobs through the queue and the worker, run-plugin, failures, the
timeout, the sandbox (no network, read-only input) and hostile output. Every test checks
that no container of its run is left behind.

Skipped with the reason when no engine runs containers here; CI (.ci/run) sets
CIRCUS_REQUIRE_CONTAINER_ENGINE=1 after the engine setup succeeded, making that a failure.
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import worker
from models import PluginDefinition, db
from tests.container_engine import (EngineUnavailable, ImageBuilder, check_engine,
                                    containers_of, find_engine)
from tests.factories import make_plugin
from tests.plugin_helpers import grant, store_sample_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RAW_BYTES = 320 * 260 * 10 * 2  # head-first: 10 slices of 320x260, 16 bits

# Reports what the sandbox allows; writes results, a sub-folder and a file of its input size.
GOOD = r"""#!/bin/sh
echo "hello from the container"
echo "a warning on stderr" >&2
size=$(wc -c < /circus/in/0.raw)
nets=$(ls /sys/class/net | tr '\n' ' ')
if touch /circus/in/probe 2>/dev/null; then input_writable=true; else input_writable=false; fi
if wget -q -T 3 -O /dev/null http://1.1.1.1/ 2>/dev/null; then reached=true; else reached=false; fi
mkdir -p /circus/out/sub
echo note > /circus/out/sub/note.txt
echo "$size" > /circus/out/size.txt
printf '{"results": {"lesionCandidates": [{"volumeId": 0, "location": [1, 2, 3], "confidence": 0.9}], "rawBytes": %s, "interfaces": "%s", "inputWritable": %s, "internetReached": %s, "uid": %s}}' \
  "$size" "$nets" "$input_writable" "$reached" "$(id -u)" > /circus/out/results.json
"""
FAILING = """#!/bin/sh
echo "step 1: loading"
echo "fatal: no lungs found in volume 0" >&2
exit 3
"""
# PID 1 ignores SIGTERM, so stopping it needs the SIGKILL after the grace period.
ENDLESS = """#!/bin/sh
trap '' TERM
echo "sleeping forever"
while :; do sleep 1; done
"""
LEAKY = """#!/bin/sh
ln -s /etc/passwd /circus/out/leak.txt
ln -s /etc /circus/out/etc
echo '{"results": {}}' > /circus/out/results.json
"""
NOT_JSON = """#!/bin/sh
printf '%0.s[' $(seq 1 2000) > /circus/out/results.json
"""


@pytest.fixture(scope="session")
def images():
    """The engine's image builder for the whole run; its images are removed at the end."""
    builder = None
    try:
        builder = ImageBuilder(find_engine())
        check_engine(builder)
    except EngineUnavailable as exc:
        if builder is not None:
            builder.close()
        if os.environ.get("CIRCUS_REQUIRE_CONTAINER_ENGINE") == "1":
            pytest.fail(f"CIRCUS_REQUIRE_CONTAINER_ENGINE=1 but: {exc}")
        pytest.skip(str(exc))
    yield builder
    builder.close()


def plugin_image(images, script, manifest=None):
    return images.build({"/plugin/run.sh": script}, ["/plugin/run.sh"], manifest)


@pytest.fixture
def env(app, client, tokens, auth_headers, dicom_dir, images):
    app.config.update(PLUGIN_DOCKER_COMMAND=images.engine, PLUGIN_DOCKER_STOP_GRACE=1)
    with app.app_context():
        uid = store_sample_series(dicom_dir / "head-first")
    return SimpleNamespace(app=app, client=client, headers=auth_headers, series_uid=uid,
                           engine=images.engine, images=images,
                           data=Path(app.config["CIRCUS_DATA_DIR"]))


def run_job(env, image, **run_configuration):
    """POST a job of ``image`` (registered on first use), run the worker; return the job,
    its log, and its results folder. Checks that no container of the job is left."""
    with env.app.app_context():
        if db.session.get(PluginDefinition, image) is None:
            make_plugin(image, run_configuration={"timeout": 60, "gpus": "",
                                                  **run_configuration})
            db.session.commit()
            grant("bob@example.com", image)
    res = env.client.post("/api/plugin-jobs", headers=env.headers["bob"], json={
        "pluginId": image, "series": [{"seriesUid": env.series_uid,
                                       "partialVolumeDescriptor": "auto"}]})
    assert res.status_code == 201, res.get_json()
    job_id = res.get_json()["jobId"]
    with env.app.app_context():
        assert worker.run_pending() >= 1
    job = env.client.get(f"/api/plugin-jobs/{job_id}", headers=env.headers["bob"]).get_json()
    assert containers_of(env.engine, job_id) == []
    assert not (env.data / "work" / job_id).exists()
    results_dir = env.data / "plugin-results" / job_id
    return job, (results_dir / "plugin-log.txt").read_text(), results_dir


def test_register_cad_plugin_reads_the_manifest_of_the_image(env):
    manifest = {"type": "CAD", "pluginName": "Real CAD", "version": "3.1.4",
                "description": "From a real image", "displayStrategy": [
                    {"type": "LesionCandidates", "feedbackKey": "lesions", "caption": "L"}]}
    image = plugin_image(env.images, GOOD, manifest)
    result = env.app.test_cli_runner().invoke(args=["register-cad-plugin", "--yes", image])
    assert result.exit_code == 0, result.output
    assert "Registered Real CAD v3.1.4" in result.output
    with env.app.app_context():
        plugin = db.session.get(PluginDefinition, image)
        assert plugin.description == "From a real image"
        assert plugin.display_strategy[0]["feedbackKey"] == "lesions"
    assert containers_of(env.engine, image=image) == []   # docker create's is removed
    missing = env.app.test_cli_runner().invoke(args=["register-cad-plugin", "--yes", "0" * 64])
    assert missing.exit_code != 0
    assert "Docker could not create a container of the image" in missing.output


def test_job_runs_in_a_sandbox_and_records_results(env):
    job, log, results_dir = run_job(env, plugin_image(env.images, GOOD))
    assert job["status"] == "finished", (job["errorMessage"], log)
    assert job["results"]["results"] == {
        "lesionCandidates": [{"volumeId": 0, "location": [1, 2, 3], "confidence": 0.9}],
        "rawBytes": RAW_BYTES,
        "interfaces": "lo ",           # --network none: loopback only
        "inputWritable": False,        # in/ is mounted read-only
        "internetReached": False,
        "uid": os.getuid()}            # the job manager's uid
    assert "hello from the container" in log and "a warning on stderr" in log
    assert "--network none" in log and "/circus/in:ro" in log
    assert (results_dir / "size.txt").read_text().strip() == str(RAW_BYTES)
    res = env.client.get(f"/api/plugin-jobs/{job['jobId']}/attachment",
                         headers=env.headers["bob"])
    assert res.get_json() == ["plugin-log.txt", "results.json", "size.txt", "sub",
                              "sub/note.txt"]


def test_run_plugin_command(env, tmp_path):
    image = plugin_image(env.images, GOOD)
    with env.app.app_context():
        make_plugin(image)
        db.session.commit()
    out = tmp_path / "run-out"
    result = env.app.test_cli_runner().invoke(args=[
        "run-plugin", image, f"{env.series_uid}:1:10:1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Finished: 1 lesion candidate(s)" in result.output
    assert json.loads((out / "results.json").read_text())["results"]["rawBytes"] == RAW_BYTES
    assert "hello from the container" in (out / "plugin-log.txt").read_text()
    assert sorted(os.listdir(env.data / "work")) == []
    assert [n for n in containers_of(env.engine) if n.startswith("circus-job-run-")] == []


def test_plugin_that_exits_with_an_error(env):
    job, log, results_dir = run_job(env, plugin_image(env.images, FAILING))
    assert job["status"] == "failed" and job["results"] is None
    assert job["errorMessage"] == "The plug-in exited with status 3: " \
                                  "fatal: no lungs found in volume 0"
    assert "step 1: loading" in log and "The container exited with status 3." in log
    assert os.listdir(results_dir) == ["plugin-log.txt"]


def test_plugin_that_never_exits_is_stopped_at_the_timeout(env):
    job, log, _results_dir = run_job(env, plugin_image(env.images, ENDLESS), timeout=1)
    assert job["status"] == "failed"
    assert job["errorMessage"] == "The container did not finish within the timeout of 1000 ms."
    assert "sleeping forever" in log
    assert f"stopping container circus-job-{job['jobId']}" in log


def test_missing_image(env):
    job, _log, _results_dir = run_job(env, "0" * 64)
    assert job["status"] == "failed"
    assert job["errorMessage"].startswith("The container could not be started: ")


def test_links_written_by_the_plugin_are_not_followed(env):
    job, log, results_dir = run_job(env, plugin_image(env.images, LEAKY))
    assert job["status"] == "finished", job["errorMessage"]
    assert sorted(os.listdir(results_dir)) == ["plugin-log.txt", "results.json"]
    assert "Skipped leak.txt: not a regular file" in log
    assert "Skipped etc: not a regular file" in log
    assert "root:" not in log


def test_results_json_nested_without_end(env):
    job, _log, _results_dir = run_job(env, plugin_image(env.images, NOT_JSON))
    assert job["status"] == "failed"
    assert job["errorMessage"] == "Plug-in validation failed: Nested more than 64 levels deep"


def test_output_over_the_file_limit_fails_the_job_and_copies_nothing(env):
    env.app.config["PLUGIN_RESULTS_MAX_FILES"] = 3    # GOOD writes 4 entries
    job, _log, results_dir = run_job(env, plugin_image(env.images, GOOD))
    assert job["status"] == "failed"
    assert job["errorMessage"] == "The plug-in output has more than 3 files and folders."
    assert os.listdir(results_dir) == ["plugin-log.txt"]
