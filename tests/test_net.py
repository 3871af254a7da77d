"""The DICOM listener (dicom/net.py) in-process on a free port, with pynetdicom as the SCU."""
import io
import os
import socket
import threading
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicom import net
from dicom.image_ranges import parse_ranges
from models import DicomNode, Series, ServerParam, db
from tests.dicom_factory import make_dataset

SCU = "TESTSCU"


def add_node(app, ae_title=SCU, domain="default", allow=("echo", "store", "find", "get", "move"),
             host="", port=None):
    with app.app_context():
        db.session.add(DicomNode(ae_title=ae_title, host=host, port=port, domain=domain,
                                 allow=list(allow)))
        db.session.commit()


@pytest.fixture
def domains(app):
    with app.app_context():
        db.session.get(ServerParam, "domains").value = ["default", "other"]
        db.session.commit()


@pytest.fixture
def listener(app, domains):
    add_node(app)
    running = net.Listener(app, host="127.0.0.1", port=0).start()
    yield running
    running.stop()


def associate(listener, ae_title=SCU, contexts=((CTImageStorage, (ExplicitVRLittleEndian,)),),
              **kwargs):
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for uid, syntaxes in contexts:
        ae.add_requested_context(uid, list(syntaxes))
    return ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title, **kwargs)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()


def series_row(app, uid):
    with app.app_context():
        row = db.session.get(Series, uid)
        return None if row is None else (row.domain, row.images)


def staged_files(app):
    """Every file left in the listeners' staging folders (lock and domain files aside)."""
    base = os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom", ".staging", "net")
    found = []
    for folder, _dirs, names in os.walk(base):
        found.extend(os.path.join(folder, n) for n in names if n not in ("lock", "domain"))
    return found


def dataset(series_uid="1.2.826.0.1.3680043.10.1.1", instance=1, **tags):
    return make_dataset(series_uid=series_uid, instance=instance,
                        study_uid="1.2.826.0.1.3680043.10.1", **tags)


# --- association ------------------------------------------------------------------------

def test_echo(listener):
    assoc = associate(listener, contexts=[(Verification, (ImplicitVRLittleEndian,))])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unknown_calling_ae_is_rejected(listener):
    assoc = associate(listener, ae_title="STRANGER")
    assert assoc.is_rejected
    assert associate(listener).is_established  # the listener keeps serving others


def test_known_ae_from_the_wrong_address_is_rejected(app, listener):
    add_node(app, "FARAWAY", host="192.0.2.7")
    assert associate(listener, ae_title="FARAWAY").is_rejected
    add_node(app, "NEARBY", host="localhost")
    assoc = associate(listener, ae_title="NEARBY")
    assert assoc.is_established
    assoc.release()


def test_open_mode_admits_any_caller_into_its_domain(app, domains):
    app.config["DICOM_OPEN_DOMAIN"] = "other"
    running = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        assoc = associate(running, ae_title="ANYONE")
        assert assoc.is_established
        assert assoc.send_c_store(dataset()).Status == 0x0000
        assoc.release()
        assert wait_for(lambda: series_row(app, "1.2.826.0.1.3680043.10.1.1"))[0] == "other"
    finally:
        running.stop()


def test_unsupported_sop_class_and_transfer_syntax_are_rejected_in_negotiation(listener):
    assoc = associate(listener, contexts=[("1.2.3.4.5.6.7", (ExplicitVRLittleEndian,)),
                                          (CTImageStorage, ("1.2.3.999",)),
                                          (MRImageStorage, (ExplicitVRLittleEndian,))])
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert accepted == {MRImageStorage}
    assert {cx.abstract_syntax for cx in assoc.rejected_contexts} == {"1.2.3.4.5.6.7",
                                                                     CTImageStorage}
    assoc.release()


def test_more_associations_than_the_limit_are_rejected(app, domains):
    add_node(app)
    app.config["DICOM_MAX_ASSOCIATIONS"] = 2
    running = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        first, second = associate(running), associate(running)
        assert first.is_established and second.is_established
        third = associate(running)
        assert third.is_rejected
        first.release()
        assert wait_for(lambda: len(running.ae.active_associations) < 2)
        fourth = associate(running)
        assert fourth.is_established
        assert fourth.send_c_store(dataset()).Status == 0x0000
        fourth.release()
        second.release()
    finally:
        running.stop()


def test_an_idle_association_is_aborted_after_the_timeout(app, domains):
    add_node(app)
    app.config["DICOM_IDLE_TIMEOUT"] = 0.5
    running = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        assoc = associate(running)
        assert assoc.is_established
        assert wait_for(lambda: assoc.is_aborted, timeout=5)
        again = associate(running)
        assert again.send_c_store(dataset()).Status == 0x0000
        again.release()
    finally:
        running.stop()


# --- C-STORE ----------------------------------------------------------------------------

def test_store_reaches_the_index_within_a_second(app, listener):
    assoc = associate(listener)
    for number in (1, 2, 3):
        assert assoc.send_c_store(dataset(instance=number, z=float(number))).Status == 0x0000
    assoc.release()
    started = time.monotonic()
    row = wait_for(lambda: series_row(app, "1.2.826.0.1.3680043.10.1.1"), timeout=1.0)
    assert row is not None and time.monotonic() - started < 1.0
    assert wait_for(lambda: series_row(app, "1.2.826.0.1.3680043.10.1.1")[1] == "1-3")
    with app.app_context():
        stored = dcmread(os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom",
                                      "1.2.826.0.1.3680043.10.1.1", "00000002.dcm"))
    assert stored.InstanceNumber == 2
    assert wait_for(lambda: staged_files(app) == [])


def test_store_real_files_of_several_transfer_syntaxes(app, listener, dicom_dir):
    files = [dcmread(path) for path in sorted((dicom_dir / "misc").glob("*.dcm"))]
    # One context per (SOP class, transfer syntax): the acceptor picks one syntax of each.
    pairs = sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in files})
    assert len({ts for _uid, ts in pairs}) >= 3
    assoc = associate(listener, contexts=[(uid, (ts,)) for uid, ts in pairs])
    statuses = [assoc.send_c_store(ds).Status for ds in files]
    assoc.release()
    assert statuses == [0x0000] * len(files)
    for ds in files:
        assert wait_for(lambda: series_row(app, ds.SeriesInstanceUID)), ds.SeriesInstanceUID


def _store_bytes(listener, raw, sop_class=CTImageStorage):
    """Send raw data set bytes (after the file meta) as one C-STORE."""
    from pynetdicom import _config
    assoc = associate(listener)
    path = os.path.join(os.path.dirname(listener.app.config["CIRCUS_DATA_DIR"]), "raw.dcm")
    with open(path, "wb") as fh:
        fh.write(raw)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    return status


def _part10(ds):
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_truncated_dataset_is_refused_and_nothing_stays(app, listener):
    raw = _part10(dataset(rows=64, columns=64))
    status = _store_bytes(listener, raw[:-500])
    assert status.Status == 0xC000
    assert "ErrorComment" in status
    time.sleep(0.3)
    assert series_row(app, "1.2.826.0.1.3680043.10.1.1") is None
    assert staged_files(app) == []


def test_non_dicom_dataset_is_refused(app, listener):
    meta = _part10(dataset())
    header_end = meta.index(b"\x08\x00")  # first data set element after the file meta
    status = _store_bytes(listener, meta[:header_end] + b"\x08\x00\x16\x00garbage" * 5)
    assert status.Status in (0xC000, 0xA900)
    assert staged_files(app) == []


def test_instance_without_series_uid_is_refused(app, listener):
    assoc = associate(listener)
    status = assoc.send_c_store(dataset(SeriesInstanceUID=None))
    assoc.release()
    assert status.Status == 0xA900
    assert "ErrorComment" in status
    assert staged_files(app) == []


def test_instance_of_a_series_of_another_domain_is_refused(app, listener):
    add_node(app, "OTHERNODE", domain="other")
    first = associate(listener)
    assert first.send_c_store(dataset(instance=1)).Status == 0x0000
    first.release()
    assert wait_for(lambda: series_row(app, "1.2.826.0.1.3680043.10.1.1"))
    other = associate(listener, ae_title="OTHERNODE")
    status = other.send_c_store(dataset(instance=2))
    # A series still staged (not yet committed) is refused as well.
    pending_uid = "1.2.826.0.1.3680043.10.1.2"
    assert other.send_c_store(dataset(series_uid=pending_uid)).Status == 0x0000
    other.release()
    mine = associate(listener)
    assert mine.send_c_store(dataset(series_uid=pending_uid, instance=2)).Status == 0x0124
    mine.release()
    assert status.Status == 0x0124
    assert "another domain" in status.ErrorComment
    assert wait_for(lambda: series_row(app, pending_uid)) == ("other", "1")
    assert series_row(app, "1.2.826.0.1.3680043.10.1.1") == ("default", "1")


def test_node_without_store_is_refused(app, listener):
    add_node(app, "LOOKER", allow=("echo", "find"))
    assoc = associate(listener, ae_title="LOOKER")
    assert assoc.send_c_store(dataset()).Status == 0x0124
    assoc.release()


def test_instances_left_staged_by_a_dead_listener_are_imported_at_start(app, domains):
    add_node(app)
    first = net.Listener(app, host="127.0.0.1", port=0).start()
    first.stopping.set()  # the committer stops: what is acknowledged stays staged
    first.committer.join()
    assoc = associate(first)
    for number in (1, 2):
        assert assoc.send_c_store(dataset(instance=number)).Status == 0x0000
    assoc.release()
    first.server.shutdown()
    os.close(first.lock_fd)  # as if the process died: its lock is free
    first.lock_fd = None
    assert series_row(app, "1.2.826.0.1.3680043.10.1.1") is None
    assert len(staged_files(app)) == 2
    second = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        assert series_row(app, "1.2.826.0.1.3680043.10.1.1") == ("default", "1-2")
        assert staged_files(app) == []
    finally:
        second.stop()


def test_a_running_listeners_staged_instances_are_left_alone(app, domains):
    add_node(app)
    first = net.Listener(app, host="127.0.0.1", port=0).start()
    first.stopping.set()
    first.committer.join()
    assoc = associate(first)
    assert assoc.send_c_store(dataset()).Status == 0x0000
    assoc.release()
    second = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        assert series_row(app, "1.2.826.0.1.3680043.10.1.1") is None
        assert len(staged_files(app)) == 1
    finally:
        second.stop()
    first.stopping.clear()
    first.committer = threading.Thread(target=first._run_committer)
    first.committer.start()
    first.stop()  # imports what it acknowledged on the way out
    assert series_row(app, "1.2.826.0.1.3680043.10.1.1") == ("default", "1")
    assert staged_files(app) == []


def test_many_instances_are_committed_in_batches(app, listener):
    assoc = associate(listener)
    for number in range(1, 41):
        assert assoc.send_c_store(dataset(instance=number, z=float(number))).Status == 0x0000
    assoc.release()
    assert wait_for(lambda: (series_row(app, "1.2.826.0.1.3680043.10.1.1") or ("", ""))[1]
                    == "1-40")
    assert parse_ranges(series_row(app, "1.2.826.0.1.3680043.10.1.1")[1]) == [(1, 40)]


def test_port_in_use_is_a_clear_error(app, domains):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(OSError):
            net.Listener(app, host="127.0.0.1", port=sock.getsockname()[1]).start()
