"""A real container engine for the CAD plug-in tests and benchmarks: finding one that runs
containers, and building plug-in images offline (no registry is reachable here).

The engine is CIRCUS_PLUGIN_DOCKER_COMMAND when set, else the first of ``podman`` and
``docker`` that answers ``info``. An image is a busybox root file system (the host's static
busybox and its applet links) plus the plug-in's files and ``/plugin.json``, imported with
``<engine> import --change 'CMD [...]'``; the same content is built once per ``ImageBuilder``.
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

from plugins.docker_runner import RUN_LABEL

ENGINE_CANDIDATES = ("podman", "docker")


class EngineUnavailable(Exception):
    """Raised when no container engine can run the test images (the message says why)."""


def find_engine():
    """The engine command that answers ``info``; EngineUnavailable otherwise."""
    configured = os.environ.get("CIRCUS_PLUGIN_DOCKER_COMMAND")
    reasons = []
    for command in [configured] if configured else ENGINE_CANDIDATES:
        if shutil.which(command) is None:
            reasons.append(f"{command}: not installed")
            continue
        try:
            info = subprocess.run([command, "info"], capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            reasons.append(f"{command}: `info` did not answer within 60 s")
            continue
        if info.returncode == 0:
            return command
        lines = (info.stderr or info.stdout).decode("utf-8", "replace").strip().splitlines()
        reasons.append(f"{command}: `info` failed: {lines[-1] if lines else '?'}")
    raise EngineUnavailable("No container engine (see ../shared/tools/podman-setup.sh): "
                            + "; ".join(reasons))


def busybox_path():
    """The host's static busybox (Debian: busybox-static), the test images' only program."""
    path = shutil.which("busybox")
    if path is None:
        raise EngineUnavailable("busybox is not installed (Debian: busybox-static).")
    return path  # a dynamically linked one fails check_engine, which says so


class ImageBuilder:
    """Builds plug-in images and removes them all at ``close``."""

    def __init__(self, engine):
        self.engine = engine
        self.images = {}  # content digest -> image ID
        self.busybox = busybox_path()
        listed = subprocess.run([self.busybox, "--list"], capture_output=True, text=True)
        self.applets = sorted(set(listed.stdout.split()) - {"busybox"})

    def build(self, files, command, manifest=None):
        """The 64-hex ID of an image holding busybox, ``files`` ({absolute path: text or
        bytes}; executable under /plugin/), ``/plugin.json`` (``manifest``) and CMD
        ``command``."""
        manifest = manifest or {"type": "CAD", "pluginName": "Test CAD", "version": "1.0.0",
                                "description": "A test plug-in"}
        content = json.dumps([sorted((k, v if isinstance(v, str) else v.hex())
                                     for k, v in files.items()), command, manifest])
        digest = hashlib.sha256(content.encode()).hexdigest()
        if digest not in self.images:
            self.images[digest] = self._import(files, command, manifest)
        return self.images[digest]

    def _import(self, files, command, manifest):
        with tempfile.TemporaryDirectory() as folder:
            archive = os.path.join(folder, "root.tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(self.busybox, "bin/busybox")
                for applet in self.applets:
                    link = tarfile.TarInfo(f"bin/{applet}")
                    link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                    tar.addfile(link)
                for name in ("tmp", "circus/in", "circus/out"):
                    entry = tarfile.TarInfo(name)
                    entry.type, entry.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
                    tar.addfile(entry)
                contents = dict(files, **{"/plugin.json": json.dumps(manifest)})
                for path, data in contents.items():
                    data = data.encode() if isinstance(data, str) else data
                    entry = tarfile.TarInfo(path.lstrip("/"))
                    entry.size = len(data)
                    entry.mode = 0o755 if path.startswith("/plugin/") else 0o644
                    tar.addfile(entry, io.BytesIO(data))
            imported = subprocess.run(
                [self.engine, "import", "--change", "CMD " + json.dumps(command), archive],
                capture_output=True, text=True, timeout=120)
        if imported.returncode != 0:
            raise EngineUnavailable(f"`{self.engine} import` failed: {imported.stderr.strip()}")
        return imported.stdout.strip().splitlines()[-1].split(":")[-1]

    def close(self):
        if self.images:
            subprocess.run([self.engine, "rmi", "-f", *self.images.values()],
                           capture_output=True, timeout=120)
        self.images.clear()


def check_engine(builder):
    """Run one container as the runner would (no network); EngineUnavailable if it fails."""
    image = builder.build({}, ["/bin/sh", "-c", "echo container-ok"])
    try:
        ran = subprocess.run([builder.engine, "run", "--rm", "--network", "none",
                              "--pull", "never", image], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        raise EngineUnavailable(f"{builder.engine}: a container did not start in 120 s") from None
    if "container-ok" not in ran.stdout:
        raise EngineUnavailable(f"{builder.engine}: a container did not start: "
                                + (ran.stderr or ran.stdout).strip()[-500:])


def containers_of(engine, run_id=None, image=None):
    """Names of the containers (running or not) of an image, or else labelled by the runner
    (for one run, or all)."""
    if image:
        selector = f"ancestor={image}"
    else:
        selector = f"label={RUN_LABEL}={run_id}" if run_id else f"label={RUN_LABEL}"
    listed = subprocess.run([engine, "ps", "-a", "--filter", selector,
                             "--format", "{{.Names}}"], capture_output=True, text=True,
                            timeout=60)
    return listed.stdout.split()
