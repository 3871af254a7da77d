"""The real `flask --app app dicom-listener` process: killed -9 mid-association, it loses
nothing it acknowledged; and DCMTK's echoscu/storescu/findscu/getscu/movescu against it
(skipped with a clear message where DCMTK is absent)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from app import create_app
from models import Series, db
from tests.dicom_factory import write_dicom
from tests.scratch_db import scratch_database_url
from tests.test_e2e import flask_cli, free_port, process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERIES = "1.2.826.0.1.3680043.10.2.1"
STUDY = "1.2.826.0.1.3680043.10.2"


def dcmtk_tool(name):
    """DCMTK's ``name`` from PATH, not pynetdicom's same-named script in the venv."""
    venv = os.path.realpath(sys.prefix)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and not os.path.realpath(folder).startswith(venv):
            found = shutil.which(name, path=folder)
            if found:
                return found
    return None


TOOLS = {name: dcmtk_tool(name) for name in ("echoscu", "storescu", "findscu", "getscu",
                                             "movescu")}
DCMTK = all(TOOLS.values())
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="DCMTK (Debian package dcmtk: storescu, "
                                 "findscu, getscu, movescu, echoscu) is not installed")


class ListenerProcess:
    """``flask --app app dicom-listener`` on a free port, its output in a log file."""

    def __init__(self, tmp, env):
        self.tmp, self.env, self.port = tmp, env, free_port()
        self.proc = None

    def start(self):
        self.log_file = open(self.tmp / "listener.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "app", "dicom-listener",
             "--port", str(self.port)], cwd=ROOT, env=self.env, stdout=self.log_file,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(self.log())
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("the listener did not start: " + self.log())

    def log(self):
        return (self.tmp / "listener.log").read_text(errors="replace")[-3000:]

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.log_file.close()
        return code


@pytest.fixture
def setup(tmp_path):
    """The environment of a fresh data folder (and database) with one node, TESTSCU."""
    with scratch_database_url() as database_url:
        env = process_env(tmp_path / "data", database_url, TCP_NODELAY="1")
        flask_cli(env, "init-db")
        flask_cli(env, "dicom-node-add", "TESTSCU", "--host", "127.0.0.1", "--domain",
                  "default", "--allow", "echo,store,find,get,move")
        app = create_app({"CIRCUS_DATA_DIR": env["CIRCUS_DATA_DIR"],
                          "DATABASE_URL": database_url})
        yield tmp_path, env, app
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def images_of(app, uid):
    with app.app_context():
        row = db.session.get(Series, uid)
        images = None if row is None else row.images
        db.session.remove()
        return images


def test_killed_listener_loses_nothing_it_acknowledged(setup):
    tmp, env, app = setup
    # A long commit interval: nothing reaches the index before the kill.
    listener = ListenerProcess(tmp, {**env, "CIRCUS_DICOM_COMMIT_INTERVAL": "60"})
    listener.start()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CIRCUS")
    assert assoc.is_established
    files = [write_dicom(tmp / f"{n}.dcm", series_uid=SERIES, study_uid=STUDY, instance=n,
                         z=float(n)) for n in range(1, 6)]
    for path in files:
        assert assoc.send_c_store(str(path)).Status == 0x0000
    assert listener.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-association
    assoc.abort()
    assert images_of(app, SERIES) is None
    listener = ListenerProcess(tmp, env)
    listener.start()  # imports what the killed one acknowledged before it listens
    silent = socket.create_connection(("127.0.0.1", listener.port))  # never associates
    try:
        assert images_of(app, SERIES) == "1-5"
    finally:
        assert listener.stop() == 0, listener.log()  # at once, despite the silent caller
        silent.close()
    staging = tmp / "data" / "dicom" / ".staging" / "net"
    assert [p for p in staging.rglob("*") if p.is_file()] == []


@pytest.fixture
def served(setup):
    tmp, env, app = setup
    listener = ListenerProcess(tmp, env)
    listener.start()
    yield tmp, env, app, listener
    assert listener.stop() == 0, listener.log()


def dcmtk(env, tool, *args):
    done = subprocess.run([TOOLS[tool], *args], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


@needs_dcmtk
def test_dcmtk_echoscu_and_storescu(served, dicom_dir):
    tmp, env, app, listener = served
    port = str(listener.port)
    code, out = dcmtk(env, "echoscu", "-aet", "TESTSCU", "-aec", "CIRCUS", "127.0.0.1", port)
    assert code == 0, out
    code, out = dcmtk(env, "echoscu", "-aet", "NOBODY", "-aec", "CIRCUS", "127.0.0.1", port)
    assert code != 0 and "Rejected" in out, out
    files = sorted(str(p) for p in (dicom_dir / "head-first").glob("*.dcm"))
    code, out = dcmtk(env, "storescu", "-aet", "TESTSCU", "-aec", "CIRCUS", "127.0.0.1", port,
                      *files)
    assert code == 0, out
    from pydicom import dcmread
    uid = dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    deadline = time.monotonic() + 5
    while images_of(app, uid) != "1-10" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert images_of(app, uid) == "1-10"


@needs_dcmtk
def test_dcmtk_findscu_getscu_movescu(served, dicom_dir):
    from pydicom import dcmread
    tmp, env, app, listener = served
    port = str(listener.port)
    files = sorted(str(p) for p in (dicom_dir / "head-first").glob("*.dcm"))
    code, out = dcmtk(env, "storescu", "-aet", "TESTSCU", "-aec", "CIRCUS", "127.0.0.1", port,
                      *files)
    assert code == 0, out
    first = dcmread(files[0], stop_before_pixels=True)
    uid, modality = first.SeriesInstanceUID, first.Modality
    deadline = time.monotonic() + 5
    while images_of(app, uid) != "1-10" and time.monotonic() < deadline:
        time.sleep(0.05)

    found = tmp / "found"
    found.mkdir()
    code, out = dcmtk(env, "findscu", "-S", "-aet", "TESTSCU", "-aec", "CIRCUS", "-X", "-od",
                      str(found), "-k", "QueryRetrieveLevel=SERIES", "-k",
                      f"Modality={modality}", "-k", "SeriesInstanceUID", "-k",
                      "NumberOfSeriesRelatedInstances", "127.0.0.1", port)
    assert code == 0, out
    answers = [dcmread(p) for p in sorted(found.glob("rsp*.dcm"))]
    assert [(a.SeriesInstanceUID, int(a.NumberOfSeriesRelatedInstances)) for a in answers] \
        == [(uid, 10)]
    code, out = dcmtk(env, "findscu", "-v", "-S", "-aet", "TESTSCU", "-aec", "CIRCUS", "-k",
                      "QueryRetrieveLevel=SERIES", "-k", "SeriesInstanceUID=1.2*",
                      "127.0.0.1", port)
    assert "Error: DataSetDoesNotMatchSOPClass" in out, out  # 0xA900

    got = tmp / "got"
    got.mkdir()
    code, out = dcmtk(env, "getscu", "-S", "-aet", "TESTSCU", "-aec", "CIRCUS", "-od", str(got),
                      "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={uid}",
                      "127.0.0.1", port)
    assert code == 0, out
    assert len(list(got.iterdir())) == 10, out

    # movescu receives its own C-MOVE on a port of its own: a node with that port.
    move_port = free_port()
    flask_cli(env, "dicom-node-add", "MOVESCU", "--host", "127.0.0.1", "--port",
              str(move_port), "--domain", "default", "--allow", "echo")
    moved = tmp / "moved"
    moved.mkdir()
    code, out = dcmtk(env, "movescu", "-S", "-aet", "TESTSCU", "-aec", "CIRCUS", "-aem",
                      "MOVESCU", "+P", str(move_port), "-od", str(moved), "-k",
                      "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={uid}",
                      "127.0.0.1", port)
    assert code == 0, out
    assert len(list(moved.iterdir())) == 10, out
    code, out = dcmtk(env, "movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "CIRCUS", "-aem",
                      "NOWHERE", "-k", "QueryRetrieveLevel=SERIES", "-k",
                      f"SeriesInstanceUID={uid}", "127.0.0.1", port)
    assert "a801" in out.lower() or "destinationunknown" in out.lower(), out
