"""The Docker runner of CAD plug-ins (API.md 5.4) and reading files out of their images.

A CAD plug-in is a Docker image whose ID is the plug-in ID. It runs without network, as
the job manager's uid:gid, with ``in/`` mounted read-only and ``out/`` writable. The
engine is driven through its command-line program (``PLUGIN_DOCKER_COMMAND``): ``docker``,
or ``podman``, which takes the same command lines.
"""
import io
import os
import subprocess
import tarfile
import threading

from plugins.job_log import PluginRunError

DOCKER_DEFAULT_TIMEOUT = 3000  # seconds, when runConfiguration.timeout is absent (5.4)
DOCKER_STOP_GRACE = 10  # seconds between SIGTERM and SIGKILL when a container is stopped
CONTAINER_IN, CONTAINER_OUT = "/circus/in", "/circus/out"
# Every job container carries this label (value: the run ID), so an operator or a test can
# find the containers of CIRCUS (`docker ps -a --filter label=circus-cs.run`).
RUN_LABEL = "circus-cs.run"
PLUGIN_LOG_MAX_BYTES = 64 * 1024 * 1024  # container output kept in the job log (a setting)
OUTPUT_TAIL_BYTES = 4096  # the end of the output, for the error message of a failed run


class DockerUnavailableError(PluginRunError):
    """Raised when the docker command is missing or no Docker engine answers."""


def container_name(job_id):
    return f"circus-job-{job_id}"


def docker_timeout(plugin):
    """The container timeout in seconds (None = none): runConfiguration.timeout, 0 = none."""
    timeout = (plugin.run_configuration or {}).get("timeout", DOCKER_DEFAULT_TIMEOUT)
    return None if not timeout else int(timeout)


def docker_command(plugin, run_id, in_dir, out_dir, uid=None, gid=None, docker="docker"):
    """The ``docker run`` argument list for a CAD plug-in (5.4, quirk 22 fixed).

    No network, the job manager's uid:gid, ``in/`` mounted read-only on /circus/in and
    ``out/`` on /circus/out, the container removed when it exits, ``--gpus`` from
    runConfiguration.gpus, and no implicit pull (the image is the plug-in ID). The
    container is named ``container_name(run_id)`` and labelled RUN_LABEL=run_id.
    """
    for path in (in_dir, out_dir):
        if ":" in path or "," in path:
            raise PluginRunError("The work directory path must not contain ':' or ','.")
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    command = [docker, "run", "--rm", "--name", container_name(run_id),
               "--label", f"{RUN_LABEL}={run_id}", "--network", "none",
               "--pull", "never", "--user", f"{uid}:{gid}",
               "-v", f"{in_dir}:{CONTAINER_IN}:ro", "-v", f"{out_dir}:{CONTAINER_OUT}"]
    gpus = (plugin.run_configuration or {}).get("gpus")
    if gpus:
        command += ["--gpus", str(gpus)]
    command.append(plugin.plugin_id)
    return command


def _docker_quietly(docker, *args, timeout=60):
    try:
        return subprocess.run([docker, *args], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def run(plugin, run_id, in_dir, out_dir, work_dir, job_log, config):
    """The runner of "CAD" plug-ins (``plugins.runner.RUNNERS``): run the plug-in's
    container; its output goes to the job log.

    Raises PluginRunError on timeout (the container is stopped and removed), when Docker is
    missing, or when the container exits with a non-zero status (quirk 23; logs are kept;
    the message ends with the last line of output).
    """
    docker = config.get("PLUGIN_DOCKER_COMMAND", "docker")
    os.makedirs(out_dir, exist_ok=True)
    name = container_name(run_id)
    command = docker_command(plugin, run_id, in_dir, out_dir, docker=docker)
    timeout = docker_timeout(plugin)
    grace = config.get("PLUGIN_DOCKER_STOP_GRACE", DOCKER_STOP_GRACE)
    job_log.line("Executing the plug-in (Docker): " + " ".join(command))
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DockerUnavailableError(
            f"Docker is not available: the command {docker!r} was not found.") from None
    output = OutputPump(process.stdout, job_log,
                        config.get("PLUGIN_LOG_MAX_BYTES", PLUGIN_LOG_MAX_BYTES))
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job_log.line(f"Timeout after {timeout} s: stopping container {name}")
        _docker_quietly(docker, "stop", "-t", str(grace), name, timeout=grace + 60)
        try:  # `run --rm` removes the stopped container, then exits
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _docker_quietly(docker, "rm", "-f", name)
        output.join(5)
        raise PluginRunError(
            f"The container did not finish within the timeout of {timeout * 1000} ms.") from None
    output.join()
    if status != 0:
        detail = output.last_line()
        job_log.line(f"The container exited with status {status}.")
        if status == 125 or "Cannot connect to the Docker daemon" in detail:
            raise PluginRunError(f"The container could not be started: {detail}")
        raise PluginRunError(f"The plug-in exited with status {status}"
                             + (f": {detail}" if detail else "."))


class OutputPump:
    """Copies a container's output to the job log on a thread, in chunks (a line without
    end never fills memory), up to ``max_bytes``; keeps the last bytes for error messages."""

    def __init__(self, stream, job_log, max_bytes):
        self.stream, self.job_log, self.max_bytes = stream, job_log, max_bytes
        self.logged, self.tail = 0, b""
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for chunk in iter(lambda: self.stream.read1(64 * 1024), b""):
            self.tail = (self.tail + chunk)[-OUTPUT_TAIL_BYTES:]
            if self.logged < self.max_bytes:
                kept = chunk[:self.max_bytes - self.logged]
                self.job_log.raw(kept)
                self.logged += len(kept)
                if self.logged >= self.max_bytes:
                    self.job_log.raw(b"\n")
                    self.job_log.line(f"(The plug-in output past {self.max_bytes} bytes "
                                      "is not logged.)")

    def join(self, timeout=None):
        self.thread.join(timeout)

    def last_line(self):
        """The last non-empty output line, printable characters only, at most 200."""
        lines = self.tail.decode("utf-8", "replace").strip().splitlines()
        text = lines[-1].strip() if lines else ""
        return "".join(c if c.isprintable() else "?" for c in text)[:200]


def docker_available(docker="docker"):
    """Whether a Docker engine answers (``docker info``)."""
    result = _docker_quietly(docker, "info", timeout=20)
    return result is not None and result.returncode == 0


def docker_read_file(image, path, docker="docker"):
    """The bytes of one file in an image (``docker create`` + ``docker cp`` as a tar stream)."""
    created = _docker_quietly(docker, "create", "--pull", "never", image)
    if created is None:
        raise DockerUnavailableError(f"Docker is not available: the command {docker!r} failed.")
    if created.returncode != 0:
        raise PluginRunError("Docker could not create a container of the image: "
                             + created.stderr.decode("utf-8", "replace").strip())
    container = created.stdout.decode().strip()
    try:
        copied = _docker_quietly(docker, "cp", f"{container}:{path}", "-")
        if copied is None or copied.returncode != 0:
            raise PluginRunError(f"The image has no file {path}.")
        with tarfile.open(fileobj=io.BytesIO(copied.stdout)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            if member is None:
                raise PluginRunError(f"The image has no file {path}.")
            return tar.extractfile(member).read()
    finally:
        _docker_quietly(docker, "rm", "-f", container)


def docker_copy_folder(image, path, target, docker="docker"):
    """Copy a folder of an image to ``target`` (which must not exist yet)."""
    created = _docker_quietly(docker, "create", "--pull", "never", image)
    if created is None or created.returncode != 0:
        raise DockerUnavailableError("Docker could not create a container of the image.")
    container = created.stdout.decode().strip()
    try:
        copied = _docker_quietly(docker, "cp", f"{container}:{path}", target, timeout=600)
        if copied is None or copied.returncode != 0:
            raise PluginRunError(f"The image has no folder {path}.")
    finally:
        _docker_quietly(docker, "rm", "-f", container)
