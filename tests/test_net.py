"""The DICOM listener (dicom/net.py) in-process on a free port, with pynetdicom as the SCU."""
import io
import json
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

from dicom import net, staging_log
from dicom.image_ranges import parse_ranges
from models import AuditEvent, DicomNode, Series, ServerParam, db
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
    """What the listeners' staging holds for the index: every record of their logs not
    marked done, and every other file (lock and domain files and the logs' segment files
    aside)."""
    base = os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom", ".staging", "net")
    if not os.path.isdir(base):
        return []
    found = set()
    for name in os.listdir(base):
        if os.path.isdir(os.path.join(base, name)):
            found.update(f"{r.path}@{r.offset}" for r in
                         staging_log.pending_records(os.path.join(base, name)))
    for folder, _dirs, names in os.walk(base):
        records = "domain" in names  # its .dcm files are records, counted above
        found.update(os.path.join(folder, n) for n in names
                     if n not in ("lock", "domain") and not n.startswith(staging_log.PREFIX)
                     and not (records and n.endswith(".dcm")))
    return sorted(found)


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


def test_large_instances_reach_the_index_as_sent(app, listener):
    # Over staging_log.LARGE_BYTES: staged as files of their own, linked into place.
    sent = [dataset(instance=n, rows=512, columns=512) for n in (1, 2)]
    assoc = associate(listener)
    assert [assoc.send_c_store(ds).Status for ds in sent] == [0x0000, 0x0000]
    assoc.release()
    assert wait_for(lambda: (series_row(app, "1.2.826.0.1.3680043.10.1.1") or ("", ""))[1]
                    == "1-2")
    stored = dcmread(os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom",
                                  "1.2.826.0.1.3680043.10.1.1", "00000002.dcm"))
    assert stored.PixelData == sent[1].PixelData and len(stored.PixelData) > 256 * 1024
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
    assert status.Status == 0xC000, hex(status.Status)
    assert "ErrorComment" in status
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
    assoc = associate(listener, ae_title="LOOKER",
                      contexts=[(CTImageStorage, (ExplicitVRLittleEndian,)),
                                (Verification, (ImplicitVRLittleEndian,))])
    assert assoc.is_established  # storage is rejected in negotiation
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    assoc.release()
    # A node that may get (storage contexts stay, for the C-STORE sub-operations) but not
    # store is refused each instance.
    add_node(app, "GETTER", allow=("get",))
    assoc = associate(listener, ae_title="GETTER")
    status = assoc.send_c_store(dataset())
    assoc.release()
    assert status.Status == 0x0124
    assert staged_files(app) == []


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


def test_instances_a_listener_of_the_file_layout_left_are_imported_at_start(app, domains):
    # The previous staging layout: a folder per domain (its name in "domain"), a file per
    # instance, and the dead listener's lock file.
    base = os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom", ".staging", "net")
    folder = os.path.join(base, "01OLDLISTENER", "0123456789abcdef0123")
    os.makedirs(folder)
    open(os.path.join(base, "01OLDLISTENER", "lock"), "wb").close()
    with open(os.path.join(folder, "domain"), "wb") as fh:
        fh.write(b"other")
    for number in (1, 2):
        with open(os.path.join(folder, f"{number:010d}.dcm"), "wb") as fh:
            fh.write(_part10(dataset(instance=number)))
    with open(os.path.join(folder, "0000000003.dcm"), "wb") as fh:
        fh.write(_part10(dataset(instance=3))[:-100])  # being written when it died
    running = net.Listener(app, host="127.0.0.1", port=0).start()
    try:
        assert series_row(app, "1.2.826.0.1.3680043.10.1.1") == ("other", "1-2")
        assert staged_files(app) == []
    finally:
        running.stop()


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


# --- C-FIND, C-GET, C-MOVE --------------------------------------------------------------

STUDY_A, STUDY_B = "1.2.826.0.1.3680043.10.5", "1.2.826.0.1.3680043.10.6"
CT_SERIES, MR_SERIES = "1.2.826.0.1.3680043.10.5.1", "1.2.826.0.1.3680043.10.5.2"
HIDDEN = "1.2.826.0.1.3680043.10.6.1"


@pytest.fixture
def stored(app, listener):
    """Study A (CT series of 3, MR series of 2, patient DOE^JANE) in domain default; study B
    (patient DOE^JOHN) in domain other, which TESTSCU must never see."""
    add_node(app, "OTHERNODE", domain="other")
    assoc = associate(listener, contexts=[(CTImageStorage, (ExplicitVRLittleEndian,)),
                                          (MRImageStorage, (ExplicitVRLittleEndian,))])
    for number in (1, 2, 3):
        assert assoc.send_c_store(make_dataset(
            series_uid=CT_SERIES, study_uid=STUDY_A, instance=number, z=float(number),
            PatientName="DOE^JANE", PatientID="P1", StudyDate="20200315",
            AccessionNumber="ACC1")).Status == 0
    for number in (1, 2):
        ds = make_dataset(series_uid=MR_SERIES, study_uid=STUDY_A, instance=number,
                          modality="MR", PatientName="DOE^JANE", PatientID="P1",
                          StudyDate="20200315", AccessionNumber="ACC1")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    other = associate(listener, ae_title="OTHERNODE")
    assert other.send_c_store(make_dataset(series_uid=HIDDEN, study_uid=STUDY_B,
                                           PatientName="DOE^JOHN", PatientID="P2")).Status == 0
    other.release()
    for uid, images in ((CT_SERIES, "1-3"), (MR_SERIES, "1-2"), (HIDDEN, "1")):
        assert wait_for(lambda: (series_row(app, uid) or (0, 0))[1] == images), uid
    return listener


def find(listener, level, model=None, **keys):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind
    model = model or StudyFind
    assoc = associate(listener, contexts=[(model, (ExplicitVRLittleEndian,))])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    answers = list(assoc.send_c_find(identifier, model))
    assoc.release()
    return [(status.Status, ds) for status, ds in answers]


def test_find_study_by_patient_name_wildcard_and_date_range(stored):
    answers = find(stored, "STUDY", PatientName="DOE*", StudyDate="20200101-20201231",
                   StudyInstanceUID="", ModalitiesInStudy="", AccessionNumber="",
                   NumberOfStudyRelatedInstances="")
    assert [s for s, _ in answers] == [0xFF00, 0x0000]
    study = answers[0][1]
    assert study.StudyInstanceUID == STUDY_A  # study B lives in another domain
    assert sorted(study.ModalitiesInStudy) == ["CT", "MR"]
    assert study.AccessionNumber == "ACC1" and study.NumberOfStudyRelatedInstances == 5
    assert study.QueryRetrieveLevel == "STUDY"
    assert [s for s, _ in find(stored, "STUDY", PatientName="DOE?JANE", StudyDate="20210101-")] \
        == [0x0000]


def test_find_series_without_the_study_uid(stored):
    answers = find(stored, "SERIES", Modality="MR", SeriesInstanceUID="")
    assert [s for s, _ in answers] == [0xFF00, 0x0000]
    series = answers[0][1]
    assert (series.SeriesInstanceUID, series.StudyInstanceUID, series.Modality) == \
        (MR_SERIES, STUDY_A, "MR")
    everything = find(stored, "SERIES", SeriesInstanceUID="")
    assert sorted(ds.SeriesInstanceUID for s, ds in everything if s == 0xFF00) == \
        [CT_SERIES, MR_SERIES]


def test_find_images_of_a_series_and_patients(stored):
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientFind
    answers = find(stored, "IMAGE", SeriesInstanceUID=CT_SERIES, SOPInstanceUID="",
                   InstanceNumber="")
    images = [ds for s, ds in answers if s == 0xFF00]
    assert [int(ds.InstanceNumber) for ds in images] == [1, 2, 3]
    assert all(ds.SOPInstanceUID for ds in images)
    patients = find(stored, "PATIENT", model=PatientFind, PatientID="", PatientName="")
    assert [(str(ds.PatientName), ds.PatientID) for s, ds in patients if s == 0xFF00] == \
        [("DOE^JANE", "P1")]


@pytest.mark.parametrize("level, keys", [
    ("SERIES", {"SeriesInstanceUID": "1.2.826.*"}),
    ("STUDY", {"StudyDate": "2020-13-01"}),
    ("STUDY", {"StudyDate": "20201301"}),
    ("BOGUS", {"PatientID": ""}),
    ("STUDY", {"SOPInstanceUID": "1.2.3"}),
])
def test_malformed_find_identifiers_are_refused(stored, level, keys):
    answers = find(stored, level, **keys)
    assert [s for s, _ in answers] == [0xA900]
    assert find(stored, "SERIES", SeriesInstanceUID="")[-1][0] == 0x0000  # still serving


def test_find_patient_level_in_study_root_is_refused(stored):
    assert [s for s, _ in find(stored, "PATIENT", PatientID="")] == [0xA900]


def test_a_node_without_find_or_get_has_no_such_context(app, stored):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyGet
    add_node(app, "STOREONLY", allow=("store",))
    assoc = associate(stored, ae_title="STOREONLY",
                      contexts=[(StudyFind, (ExplicitVRLittleEndian,)),
                                (StudyGet, (ExplicitVRLittleEndian,)),
                                (CTImageStorage, (ExplicitVRLittleEndian,))])
    assert {cx.abstract_syntax for cx in assoc.accepted_contexts} == {CTImageStorage}
    assoc.release()


def _retrieve_identifier(level, **uids):
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in uids.items():
        setattr(identifier, keyword, value)
    return identifier


def get(listener, identifier, ae_title=SCU):
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyGet
    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StudyGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title,
                         ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    responses = [status for status, _ in assoc.send_c_get(identifier, StudyGet)]
    assoc.release()
    return responses, received


def test_get_a_series_a_study_and_an_instance(stored):
    responses, received = get(stored, _retrieve_identifier("SERIES", SeriesInstanceUID=CT_SERIES))
    final = responses[-1]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 0)
    assert [p.NumberOfRemainingSuboperations for p in responses[:-1]] == [2, 1, 0]
    assert sorted(int(ds.InstanceNumber) for ds in received) == [1, 2, 3]
    responses, received = get(stored, _retrieve_identifier("STUDY", StudyInstanceUID=STUDY_A))
    assert responses[-1].NumberOfCompletedSuboperations == 5 and len(received) == 5
    sop = received[0].SOPInstanceUID
    responses, received = get(stored, _retrieve_identifier("IMAGE", SOPInstanceUID=sop))
    assert [ds.SOPInstanceUID for ds in received] == [sop]


def test_a_retrieve_is_audited_before_anything_is_sent(app, stored):
    get(stored, _retrieve_identifier("SERIES", SeriesInstanceUID=CT_SERIES))
    with app.app_context():
        rows = db.session.execute(db.select(AuditEvent).where(
            AuditEvent.action == "dicom-get")).scalars().all()
        assert [(r.target_type, r.target_id, r.user_email) for r in rows] == [
            ("series", CT_SERIES, None)]
        detail = json.loads(rows[0].detail)
    assert (detail["callingAeTitle"], detail["instances"], detail["domain"]) == (
        SCU, 3, "default")


def test_get_sees_only_the_nodes_domain_and_refuses_wildcards(stored):
    responses, received = get(stored, _retrieve_identifier("SERIES", SeriesInstanceUID=HIDDEN))
    assert responses[-1].Status == 0x0000 and received == []
    assert responses[-1].NumberOfCompletedSuboperations == 0
    responses, received = get(stored, _retrieve_identifier("SERIES",
                                                           SeriesInstanceUID="1.2.826.*"))
    assert responses[-1].Status == 0xA900 and received == []
    responses, _ = get(stored, _retrieve_identifier("SERIES"))
    assert responses[-1].Status == 0xA900


@pytest.fixture
def destination(app):
    """A storage SCP (pynetdicom) registered as node DEST; what it receives."""
    from pynetdicom import evt
    received = []

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    add_node(app, "DEST", host="127.0.0.1", port=server.server_address[1], allow=())
    add_node(app, "NOPORT", host="127.0.0.1", allow=())
    yield received
    server.shutdown()


def move(listener, identifier, destination_aet):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyMove
    assoc = associate(listener, contexts=[(StudyMove, (ExplicitVRLittleEndian,))])
    responses = [status for status, _ in assoc.send_c_move(identifier, destination_aet,
                                                           StudyMove)]
    assoc.release()
    return responses


def test_move_a_study_to_a_registered_node(stored, destination):
    responses = move(stored, _retrieve_identifier("STUDY", StudyInstanceUID=STUDY_A), "DEST")
    final = responses[-1]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (5, 0)
    assert len(destination) == 5
    assert {ds.SeriesInstanceUID for ds in destination} == {CT_SERIES, MR_SERIES}


def test_move_to_an_unknown_or_unaddressable_destination(stored, destination):
    identifier = _retrieve_identifier("SERIES", SeriesInstanceUID=CT_SERIES)
    assert [r.Status for r in move(stored, identifier, "NOBODY")] == [0xA801]
    assert [r.Status for r in move(stored, identifier, "NOPORT")] == [0xA801]
    assert destination == []


def test_part10_builds_a_file_pydicom_reads():
    ds = dataset()
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)  # the data set only
    raw = net.part10(CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                     buffer.getvalue())
    parsed = dcmread(io.BytesIO(raw))
    meta = parsed.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID,
            meta.TransferSyntaxUID) == (CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    assert meta.FileMetaInformationGroupLength == len(raw) - 144 - len(buffer.getvalue())
    assert parsed.SeriesInstanceUID == ds.SeriesInstanceUID


def test_stop_is_prompt_with_a_silent_connection_open(app, domains):
    running = net.Listener(app, host="127.0.0.1", port=0).start()  # idle timeout: 60 s
    silent = socket.create_connection(("127.0.0.1", running.port))
    try:
        time.sleep(0.2)
        started = time.monotonic()
        running.stop()
        assert time.monotonic() - started < 5
    finally:
        silent.close()
