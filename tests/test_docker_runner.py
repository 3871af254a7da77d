"""CAD (Docker) plug-ins: the `docker run` command, the runner's process handling, plug-in
displays and register-cad-plugin, against a stand-in engine; tests/test_container_plugins.py
runs the same paths in a real one (podman or docker).

The runner talks to a small stand-in `docker` program written below: it is a different
process with Docker's command-line contract (run/stop/rm/create/cp/info, exit status 125
for an unknown image), so the runner's process handling, timeouts and logs are real, and
cases a real engine makes slow or awkward (a missing engine, displays) stay cheap.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import worker
from models import PluginDefinition, db
from plugins import docker_runner, runner
from tests.factories import make_plugin
from tests.plugin_helpers import grant, store_sample_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MISSING_IMAGE = "0" * 64
SLEEPY_IMAGE = "5" * 64
FAILING_IMAGE = "3" * 64
LEAKY_IMAGE = "1" * 64
GOOD_IMAGE = "a" * 64

FAKE_DOCKER = textwrap.dedent(r'''
    #!{python}
    """Stand-in for the docker CLI (see tests/test_docker_runner.py)."""
    import io, json, os, sys, tarfile, time
    calls = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
    with open(calls, "a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\n")
    command, args = sys.argv[1], sys.argv[2:]
    if command == "info":
        sys.exit(1)
    if command == "stop":  # ends the `run` of that name, as the engine would
        pid_file = os.path.join(os.path.dirname(calls), args[-1] + ".pid")
        if os.path.exists(pid_file):
            os.kill(int(open(pid_file).read()), 15)
        sys.exit(0)
    if command == "rm":
        sys.exit(0)
    if command == "create":
        image = args[-1]
        if image == "{missing}":
            print("Error: No such image: " + image, file=sys.stderr)
            sys.exit(1)
        print("c0ffee" + image[:10])
        sys.exit(0)
    if command == "cp":
        source, target = args
        image = source.split(":")[0][6:]
        if source.endswith(":/plugin.json"):
            manifest = json.dumps({{"type": "CAD", "pluginName": "Fake CAD", "version": "2.0.0",
                                   "description": "from the manifest"}}).encode()
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                info = tarfile.TarInfo("plugin.json")
                info.size = len(manifest)
                tar.addfile(info, io.BytesIO(manifest))
            sys.stdout.buffer.write(buffer.getvalue())
            sys.exit(0)
        if source.endswith(":/displays") and image.startswith("aaaa"):
            os.makedirs(target)
            with open(os.path.join(target, "remoteEntry.js"), "w") as fh:
                fh.write("window.entry = 'é';\n")
            sys.exit(0)
        print("Error: Could not find the file /displays in container", file=sys.stderr)
        sys.exit(1)
    if command == "run":
        image = args[-1]
        with open(os.path.join(os.path.dirname(calls), args[args.index("--name") + 1] + ".pid"),
                  "w") as fh:
            fh.write(str(os.getpid()))
        mounts = dict(reversed(args[i + 1].split(":")[:2])
                      for i, a in enumerate(args) if a == "-v")
        if image == "{missing}":
            print("docker: Error response from daemon: No such image: " + image,
                  file=sys.stderr)
            sys.exit(125)
        if image == "{sleepy}":
            print("sleeping", flush=True)
            time.sleep(60)
        out, in_ = mounts["/circus/out"], mounts["/circus/in"]
        size = os.path.getsize(os.path.join(in_, "0.raw"))
        print("hello from the container; 0.raw has", size, "bytes", flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        if image == "{failing}":
            sys.exit(3)
        os.makedirs(os.path.join(out, "sub"))
        with open(os.path.join(out, "sub", "note.txt"), "w") as fh:
            fh.write("note")
        if image == "{leaky}":
            os.symlink("/etc/passwd", os.path.join(out, "leak.txt"))
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump({{"results": {{"rawBytes": size, "lesionCandidates": []}}}}, fh)
        sys.exit(0)
    sys.exit(2)
''').lstrip()


@pytest.fixture
def fake_docker(tmp_path):
    folder = tmp_path / "fakedocker"
    folder.mkdir()
    script = folder / "docker"
    script.write_text(FAKE_DOCKER.format(python=sys.executable, missing=MISSING_IMAGE,
                                         sleepy=SLEEPY_IMAGE, failing=FAILING_IMAGE,
                                         leaky=LEAKY_IMAGE))
    script.chmod(0o755)

    def calls():
        path = folder / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return SimpleNamespace(path=str(script), calls=calls)


@pytest.fixture
def env(app, client, tokens, auth_headers, dicom_dir, fake_docker):
    app.config["PLUGIN_DOCKER_COMMAND"] = fake_docker.path
    with app.app_context():
        uid = store_sample_series(dicom_dir / "head-first")
    return SimpleNamespace(app=app, client=client, headers=auth_headers, series_uid=uid,
                           docker=fake_docker, data=Path(app.config["CIRCUS_DATA_DIR"]))


def run_cad_job(env, image, **run_configuration):
    with env.app.app_context():
        if db.session.get(PluginDefinition, image) is None:
            make_plugin(image, run_configuration={"timeout": 900, "gpus": "", **run_configuration})
            db.session.commit()
            grant("bob@example.com", image)
    res = env.client.post("/api/plugin-jobs", headers=env.headers["bob"], json={
        "pluginId": image, "series": [{"seriesUid": env.series_uid,
                                       "partialVolumeDescriptor": "auto"}]})
    assert res.status_code == 201, res.get_json()
    job_id = res.get_json()["jobId"]
    with env.app.app_context():
        worker.run_pending()
    job = env.client.get(f"/api/plugin-jobs/{job_id}", headers=env.headers["bob"]).get_json()
    assert not (env.data / "work" / job_id).exists()
    return job, (env.data / "plugin-results" / job_id / "plugin-log.txt").read_text()


# --- the command --------------------------------------------------------------------------

def test_docker_command():
    plugin = PluginDefinition(plugin_id=GOOD_IMAGE, run_configuration={"timeout": 60,
                                                                       "gpus": "all"})
    command = docker_runner.docker_command(plugin, "01abc", "/data/work/01abc/in",
                                            "/data/work/01abc/out", uid=1000, gid=100)
    assert command == [
        "docker", "run", "--rm", "--name", "circus-job-01abc", "--label", "circus-cs.run=01abc",
        "--network", "none",
        "--pull", "never", "--user", "1000:100",
        "-v", "/data/work/01abc/in:/circus/in:ro", "-v", "/data/work/01abc/out:/circus/out",
        "--gpus", "all", GOOD_IMAGE]


def test_docker_command_without_gpus_uses_our_uid():
    plugin = PluginDefinition(plugin_id=GOOD_IMAGE, run_configuration={"gpus": ""})
    command = docker_runner.docker_command(plugin, "n", "/in", "/out", docker="/usr/bin/docker")
    assert command[0] == "/usr/bin/docker" and "--gpus" not in command
    assert command[command.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    with pytest.raises(runner.PluginRunError):
        docker_runner.docker_command(plugin, "n", "/a:b/in", "/out")


@pytest.mark.parametrize("configuration, seconds", [
    ({"timeout": 900}, 900), ({"timeout": 0}, None), ({}, 3000), ({"gpus": "1"}, 3000)])
def test_docker_timeout(configuration, seconds):
    plugin = PluginDefinition(plugin_id=GOOD_IMAGE, run_configuration=configuration)
    assert docker_runner.docker_timeout(plugin) == seconds


# --- the runner with a stand-in docker ----------------------------------------------------

def test_cad_job_runs_and_records_results(env):
    job, log = run_cad_job(env, GOOD_IMAGE, gpus="device=0")
    assert job["status"] == "finished", job["errorMessage"]
    assert job["results"] == {"results": {"rawBytes": 320 * 260 * 10 * 2, "lesionCandidates": []}}
    assert "hello from the container; 0.raw has 1664000 bytes" in log
    assert "a warning on stderr" in log
    [run] = [c for c in env.docker.calls() if c[0] == "run"]
    in_dir = str(env.data / "work" / job["jobId"] / "in")
    assert run[run.index("--gpus") + 1] == "device=0" and run[-1] == GOOD_IMAGE
    assert f"{in_dir}:/circus/in:ro" in run
    res = env.client.get(f"/api/plugin-jobs/{job['jobId']}/attachment", headers=env.headers["bob"])
    assert res.get_json() == ["plugin-log.txt", "results.json", "sub", "sub/note.txt"]


def test_cad_job_that_times_out(env):
    job, log = run_cad_job(env, SLEEPY_IMAGE, timeout=1)
    assert job["status"] == "failed"
    assert job["errorMessage"] == "The container did not finish within the timeout of 1000 ms."
    names = [c for c in env.docker.calls() if c[0] in ("stop", "rm")]
    assert [c[0] for c in names] == ["stop", "rm"]
    assert names[0][-1] == f"circus-job-{job['jobId']}"
    assert "sleeping" in log


def test_cad_image_that_does_not_exist(env):
    job, log = run_cad_job(env, MISSING_IMAGE)
    assert job["status"] == "failed"
    assert job["errorMessage"] == (
        "The container could not be started: docker: Error response from daemon: "
        f"No such image: {MISSING_IMAGE}")
    assert "No such image" in log


def test_cad_plugin_that_exits_with_an_error(env):
    job, log = run_cad_job(env, FAILING_IMAGE)
    assert job["errorMessage"] == "The plug-in exited with status 3: a warning on stderr"
    assert "hello from the container" in log and job["results"] is None


def test_links_in_the_output_are_not_followed(env):
    job, log = run_cad_job(env, LEAKY_IMAGE)
    assert job["status"] == "finished"
    assert not (env.data / "plugin-results" / job["jobId"] / "leak.txt").exists()
    assert "Skipped leak.txt: not a regular file" in log


def test_docker_missing(env):
    env.app.config["PLUGIN_DOCKER_COMMAND"] = "/nonexistent/docker"
    job, _log = run_cad_job(env, GOOD_IMAGE)
    assert job["status"] == "failed"
    assert job["errorMessage"] == (
        "Docker is not available: the command '/nonexistent/docker' was not found.")


# --- displays -----------------------------------------------------------------------------

def test_plugin_displays_are_extracted_once(env):
    with env.app.app_context():
        make_plugin(GOOD_IMAGE)
        db.session.commit()
    url = f"/api/plugin-displays/{GOOD_IMAGE}/displays/remoteEntry.js"
    for _ in range(2):
        res = env.client.get(url)                     # public: no token
        assert res.status_code == 200
        assert res.headers["Content-Type"].startswith("text/javascript")
        assert res.get_data(as_text=True) == "window.entry = 'é';\n"
    assert [c[0] for c in env.docker.calls()] == ["create", "cp", "rm"]
    assert env.client.get(f"/api/plugin-displays/{GOOD_IMAGE}/displays/other.js").status_code == 404


def test_plugin_displays_not_found(env):
    with env.app.app_context():
        make_plugin(SLEEPY_IMAGE)
        make_plugin("rmt-" + "b" * 64, type="CAD+remote")
        db.session.commit()
    for path in [f"{SLEEPY_IMAGE}/displays/remoteEntry.js",      # image without /displays
                 f"{SLEEPY_IMAGE}/displays/remoteEntry.js",
                 "rmt-" + "b" * 64 + "/displays/remoteEntry.js",  # remote: none
                 "c" * 64 + "/displays/remoteEntry.js",           # unknown plug-in
                 f"{GOOD_IMAGE}/displays/../../x.js"]:
        assert env.client.get(f"/api/plugin-displays/{path}").status_code == 404
    assert [c[0] for c in env.docker.calls()].count("cp") == 1   # the absence is remembered


# --- register-cad-plugin ------------------------------------------------------------------

def test_register_cad_plugin_command(env):
    cli = env.app.test_cli_runner()
    result = cli.invoke(args=["register-cad-plugin", "--yes", GOOD_IMAGE])
    assert result.exit_code == 0, result.output
    assert "Registered Fake CAD v2.0.0" in result.output
    with env.app.app_context():
        plugin = db.session.get(PluginDefinition, GOOD_IMAGE)
        assert plugin.run_configuration == {"timeout": 900, "gpus": ""}
        assert plugin.icon["glyph"] == "calc" and plugin.description == "from the manifest"
    result = cli.invoke(args=["register-cad-plugin", "--yes", GOOD_IMAGE])
    assert result.exit_code != 0 and "This plug-in is already installed." in result.output


@pytest.mark.parametrize("image, message", [
    ("nothex", "The plug-in ID must be 64-char hex string."),
    (MISSING_IMAGE, "Docker could not create a container of the image: Error: No such image"),
])
def test_register_cad_plugin_command_errors(env, image, message):
    result = env.app.test_cli_runner().invoke(args=["register-cad-plugin", "--yes", image])
    assert result.exit_code != 0 and message in result.output


def test_register_cad_plugin_without_docker(env):
    env.app.config["PLUGIN_DOCKER_COMMAND"] = "/nonexistent/docker"
    result = env.app.test_cli_runner().invoke(args=["register-cad-plugin", "--yes", GOOD_IMAGE])
    assert result.exit_code != 0 and "Docker is not available" in result.output


# --- the container's output -----------------------------------------------------------------

def test_output_is_logged_up_to_the_limit_without_reading_whole_lines(tmp_path):
    """8 MB on one line: the log keeps the first 1000 bytes and a note; the last line (for
    the error message) is printable and at most 200 characters."""
    process = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.stdout.write('x' * 8000000 + '\\n\\x1b[31mfatal: ' + 'y' * 300)"],
        stdout=subprocess.PIPE)
    with runner.JobLog(str(tmp_path / "log.txt")) as job_log:
        pump = docker_runner.OutputPump(process.stdout, job_log, 1000)
        process.wait()
        pump.join()
    text = (tmp_path / "log.txt").read_text()
    assert text.startswith("x" * 1000 + "\n") and "(The plug-in output past 1000 bytes " in text
    assert len(text) < 1200
    assert pump.last_line() == "?[31mfatal: " + "y" * 188
