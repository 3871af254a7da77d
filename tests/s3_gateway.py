"""An S3 gateway that checks credentials, over the throwaway store's files.

The throwaway store (../shared/tools/s3-throwaway.sh) accepts any key. ``credentialed_gateway``
starts SeaweedFS's ``weed s3`` on a free loopback port with one identity (``ACCESS_KEY``,
``SECRET_KEY``), backed by the throwaway's filer: the same buckets, behind real credential
checks (a wrong secret is SignatureDoesNotMatch, an unknown key InvalidAccessKeyId).
"""
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager

import requests

from tests.test_e2e import free_port

# The throwaway's `weed mini` serves its filer on SeaweedFS's fixed default port.
FILER = "127.0.0.1:8888"
ACCESS_KEY, SECRET_KEY = "circus-test", "circus-test-secret"
START_SECONDS = 30


class GatewayUnavailable(RuntimeError):
    """No `weed` binary, or the gateway did not answer (no throwaway filer to back it)."""


def weed_binary():
    """`weed` on PATH, else the one s3-throwaway.sh installed in its folder; None if neither."""
    found = shutil.which("weed")
    folder = os.environ.get("S3_THROWAWAY_DIR")
    installed = os.path.join(folder, "venv", "bin", "weed") if folder else ""
    return found or (installed if os.access(installed, os.X_OK) else None)


@contextmanager
def credentialed_gateway(folder):
    """Run the gateway (its config, socket and log in ``folder``) and yield its endpoint URL;
    it is stopped afterwards. GatewayUnavailable when it cannot start."""
    weed = weed_binary()
    if weed is None:
        raise GatewayUnavailable("no `weed` binary (PATH or $S3_THROWAWAY_DIR/venv/bin)")
    config = os.path.join(folder, "identities.json")
    with open(config, "w") as fh:
        json.dump({"identities": [{"name": "circus", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List"]}]}, fh)
    port = free_port()
    log_path = os.path.join(folder, "weed-s3.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [weed, "s3", f"-filer={FILER}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-port={port}", f"-port.grpc={free_port()}", "-port.iceberg=0", "-port.lance=0",
             f"-localSocket={os.path.join(folder, 's3.sock')}", f"-config={config}"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, endpoint, log_path)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(proc, endpoint, log_path):
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            requests.get(endpoint, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    with open(log_path, errors="replace") as fh:
        raise GatewayUnavailable(f"`weed s3` did not answer at {endpoint} (filer {FILER}):\n"
                                 + fh.read()[-2000:])
