"""DICOM networking: the listener, a DIMSE SCP on the series index (issue 14).

``Listener`` (``flask --app app dicom-listener``) serves C-ECHO, C-STORE, C-FIND, C-GET and
C-MOVE with pynetdicom to the nodes of the ``dicom_nodes`` table (dicom/nodes.py): an
association from an unknown calling AE title, or from an address its node does not name,
is rejected; each service needs the node's ``allow``; its stores go into the node's domain
and its queries see that domain only. ``DICOM_OPEN_DOMAIN`` admits any other caller into
one domain.

Storage: each received instance is checked as the importer checks it (header_scan; the
first instance of a new series parsed whole, as its batch will parse it; a series of
another domain refused), appended to this listener's staging log (dicom/staging_log.py:
one flush covers the instances of every association waiting at once) and only then
acknowledged. A committer thread imports what was acknowledged every
``DICOM_COMMIT_INTERVAL`` seconds through ``batch.ImportBatch`` (the checks' results
passed on, not redone): one transaction per domain and tick, not per instance. Each
listener holds an ``flock`` on its folder; a starting listener first imports what a dead
one (its lock free) left.
"""
import fcntl
import io
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)
from pynetdicom.transport import ThreadedAssociationServer

import audit
import storage
from dicom import query
from dicom import staging_log
from dicom.batch import ImportBatch
from dicom.errors import DicomImportError, DomainConflictError, InvalidInstanceError
from dicom.header_scan import read_keys
from dicom.instance import UID_RE, InstanceKeys, default_offset, extract_record, read_dataset
from models import DicomNode, Series, db, new_ulid

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.7 C, PS3.4 B.2.3 and C.4).
SUCCESS = 0x0000
PENDING = 0xFF00
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # data set / identifier does not match the SOP class
CANNOT_UNDERSTAND = 0xC000  # C-STORE: cannot understand; C-FIND/GET/MOVE: unable to process
MOVE_DESTINATION_UNKNOWN = 0xA801
CANCELLED = 0xFE00

# Association rejections (result, source, reason): permanent, by the service user.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)

OPEN_SERVICES = frozenset(("echo", "store", "find", "get"))
BATCH_MAX = 2000  # instances per ImportBatch
KNOWN_MAX = 100000  # series domains remembered
RETRY_SECONDS = 1.0  # after a commit failed for a reason that may pass (database down)
MAX_PDU = 4 * 1024 * 1024
DUL_POLL_SECONDS = 0.0002
REACTOR_WAIT_SECONDS = 0.001  # the longest the reactor waits for a request between checks
STOP_GRACE_SECONDS = 10  # after SIGTERM, the process exits within this long
# Query/retrieve information models: the service each one serves.
QR_MODELS = {PatientRootQueryRetrieveInformationModelFind: "find",
             StudyRootQueryRetrieveInformationModelFind: "find",
             PatientRootQueryRetrieveInformationModelGet: "get",
             StudyRootQueryRetrieveInformationModelGet: "get",
             PatientRootQueryRetrieveInformationModelMove: "move",
             StudyRootQueryRetrieveInformationModelMove: "move"}
STUDY_ROOT = {StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
              StudyRootQueryRetrieveInformationModelMove}
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}
MAX_SUBOPERATIONS = 65535  # a C-GET/C-MOVE response counts them in US
MAX_CONTEXTS = 128
# pynetdicom accepts the first of the acceptor's syntaxes that the requestor proposes:
# explicit VR little endian first (pydicom's list starts with implicit VR), as most files
# are, so that senders need not convert them and a C-GET sends stored files as they are.
STORAGE_SYNTAXES = [ExplicitVRLittleEndian] + [uid for uid in AllTransferSyntaxes
                                               if uid != ExplicitVRLittleEndian]


@dataclass(frozen=True)
class Session:
    """Who is on an association: the node's AE title, domain and allowed services."""
    ae_title: str
    domain: str
    allow: frozenset


@dataclass(eq=False)
class Received:
    """One acknowledged instance waiting for the index: its staging log record, its
    InstanceKeys and, for the first of a new series, the series record (as checked)."""
    domain: str
    record: staging_log.Record
    keys: InstanceKeys
    series: dict | None = None
    done: bool = False

    @property
    def series_uid(self):
        return self.keys.series_uid


class _NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every accepted socket: without it, small
    PDUs wait for delayed ACKs and a store runs at ~11 instances/s. Its connection threads
    are daemons: a connection that never sends its A-ASSOCIATE-RQ would otherwise keep the
    stopped process alive for the ACSE timeout (what associations acknowledged is staged)."""
    daemon_threads = True

    def get_request(self):
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


def _element(group_element, vr, value):
    """One explicit VR little endian file meta element (UI padded with NUL, others with a
    space; OB with its 4-byte length)."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    tag = struct.pack("<HH", 0x0002, group_element)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def part10(sop_class, sop_instance, syntax, dataset):
    """A DICOM file of a received data set: preamble, ``DICM``, the file meta group (built
    here: pydicom's writer costs ~2 ms an instance) and the data set bytes as sent."""
    meta = b"".join((
        _element(0x0001, b"OB", b"\0\1"),
        _element(0x0002, b"UI", sop_class.encode("ascii")),
        _element(0x0003, b"UI", sop_instance.encode("ascii")),
        _element(0x0010, b"UI", syntax.encode("ascii")),
        _element(0x0012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
        _element(0x0013, b"SH", b"CIRCUS"),
    ))
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(meta)))
    return b"".join((b"\0" * 128, b"DICM", group_length, meta, dataset))


def prompt_reactor(assoc):
    """pynetdicom's acceptor reactor (``Association._run_reactor``, 3.0) for ``assoc``,
    except that between loops it waits on the DIMSE message queue instead of sleeping a
    fixed 1 ms: a request is served as soon as it is decoded (each C-STORE waited ~0.5 ms
    for the sleep to end, a third of pynetdicom's own time per small instance)."""
    messages = assoc.dimse.msg_queue

    def run_reactor():
        assoc._is_paused = False
        while not assoc._kill:
            with messages.not_empty:
                if not messages._qsize():
                    messages.not_empty.wait(REACTOR_WAIT_SECONDS)
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc._is_paused = False
            context_id, msg = assoc.dimse.get_msg(block=False)
            if msg:
                assoc._serve_request(msg, context_id)
            if assoc.is_established and assoc.acse.is_release_requested():
                assoc.acse.send_release(is_response=True)
                assoc.is_released = True
                assoc.is_established = False
                evt.trigger(assoc, evt.EVT_RELEASED, {})
                assoc.kill()
                return
            if assoc.acse.is_aborted():
                assoc.dul.receive_pdu(wait=False)
                assoc.is_aborted = True
                assoc.is_established = False
                evt.trigger(assoc, evt.EVT_ABORTED, {})
                assoc.kill()
                return
            if not assoc.dul.is_alive():
                assoc.kill()
                return
            if assoc.dul.idle_timer_expired():
                log.error("Network timeout reached")
                if assoc.network_timeout_response == "A-RELEASE":
                    assoc._is_paused = True
                    assoc._reactor_checkpoint.wait()
                    assoc.release()
                    assoc._is_paused = False
                else:
                    assoc.abort()
                assoc.kill()
                return

    if pynetdicom.__version__.startswith("3.0.") and hasattr(messages, "not_empty"):
        assoc._run_reactor = run_reactor


def _no_delay(event):
    """TCP_NODELAY on the association we open to a C-MOVE destination, as on those we
    accept."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StoredFile(Dataset):
    """A stored instance a C-GET or C-MOVE sends. pynetdicom's retrieve SCPs take only
    datasets: this one stands for the file (its SOP Instance UID names it in a failure
    list), and ``send_stored_files`` sends it as its stored bytes."""

    def __init__(self, path, sop_class, syntax, sop_instance):
        super().__init__()
        self.stored_path = path
        self.stored_as = (sop_class, syntax)
        self.SOPInstanceUID = sop_instance or ""

    def parsed(self):
        """The file as a parsed dataset; ``OSError`` or ``InvalidDicomError`` when it
        cannot be read."""
        return dcmread(self.stored_path)


def send_stored_files(assoc):
    """Make ``assoc`` send each StoredFile from the file's bytes as stored, in chunks
    (pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` send from a path: nothing parsed or
    re-encoded), when one of its contexts takes the file's transfer syntax exactly; else
    parsed, for pynetdicom to convert (implicit <-> explicit VR)."""
    send = assoc.send_c_store
    if getattr(send, "sends_stored_files", False):
        return

    def send_c_store(dataset, *args, **kwargs):
        if not isinstance(dataset, StoredFile):
            return send(dataset, *args, **kwargs)
        sop_class, syntax = dataset.stored_as
        if sop_class and syntax and pynetdicom_config.STORE_SEND_CHUNKED_DATASET:
            try:
                assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=False)
            except ValueError:
                pass  # no exact context: parsed below
            else:
                try:
                    return send(dataset.stored_path, *args, **kwargs)
                except (AttributeError, InvalidDicomError):
                    pass  # its file meta lacks what the send needs (checked before sending)
        try:
            parsed = dataset.parsed()
        except (OSError, InvalidDicomError) as exc:
            log.error("Cannot read %s for a retrieve: %s", dataset.stored_path, exc)
            raise  # pynetdicom counts the sub-operation as failed
        return send(parsed, *args, **kwargs)

    send_c_store.sends_stored_files = True
    assoc.send_c_store = send_c_store


def _sends_stored_files(event):
    """``send_stored_files`` on the association a C-MOVE opens to its destination."""
    send_stored_files(event.assoc)


def _status(code, comment=None):
    """A response status, with an Error Comment (LO: 64 characters) when given."""
    if comment is None:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _text(element):
    """An identifier element as a DICOM matching string (``""``: universal matching)."""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _request(identifier, model):
    """``(level, keys)`` of a query/retrieve identifier; QueryError when malformed."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in query.LEVELS:
        raise query.QueryError(f"Unknown or missing QueryRetrieveLevel {level!r}.")
    if level == "PATIENT" and model in STUDY_ROOT:
        raise query.QueryError("The Study Root model has no PATIENT level.")
    keys = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in NOT_KEYS or element.VR == "SQ":
            continue
        keys[keyword] = _text(element)
    return level, keys


def _normal_ip(address):
    return address[7:] if address.startswith("::ffff:") else address


def host_matches(host, address):
    """Whether the peer ``address`` (an IP) is one of the addresses ``host`` names."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return _normal_ip(address) in {_normal_ip(info[4][0]) for info in infos}


def quiet_standard_handlers():
    """Unless pynetdicom logs at INFO, bind no "standard" log handlers to new associations
    (its documented ``LOG_HANDLER_LEVEL``): they format every PDU and DIMSE message, and
    copy each received data set, for lines that are then dropped."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def make_ae(ae_title, max_associations, timeout):
    """The listener's AE: its presentation contexts, maximum PDU and timeouts (also the
    bare SCP of bench/dicom_ceiling.py)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
    ae.maximum_pdu_size = MAX_PDU
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        # Both roles: a store SCP for senders, and C-GET peers take the SCP role.
        ae.add_supported_context(context.abstract_syntax, STORAGE_SYNTAXES,
                                 scu_role=True, scp_role=True)
    for model in QR_MODELS:
        ae.add_supported_context(model)
    return ae


class Listener:
    """The DICOM SCP of one process: start(), then stop(); ``port`` is the bound port."""

    def __init__(self, app, host=None, port=None):
        config = app.config
        self.app = app
        self.ae_title = config["DICOM_AET"]
        self.host = config["DICOM_HOST"] if host is None else host
        self.port = config["DICOM_PORT"] if port is None else port
        self.interval = config["DICOM_COMMIT_INTERVAL"]
        self.open_domain = config["DICOM_OPEN_DOMAIN"]
        self.max_associations = config["DICOM_MAX_ASSOCIATIONS"]
        self.timeout = config["DICOM_IDLE_TIMEOUT"]
        self.id = new_ulid()
        self.sessions = weakref.WeakKeyDictionary()  # association -> Session
        self.lock = threading.Lock()
        self.received = []  # Received, in arrival order
        self.pending = {}  # series UID -> [domain, instances staged and not yet committed]
        self.known = OrderedDict()  # series UID -> its domain in the index (bounded)
        self.log = None  # this listener's StagingLog
        self.stopping = threading.Event()
        self.lock_fd = None
        self.server = self.committer = self.ae = None
        self.offset = 0

    # --- life ---------------------------------------------------------------------------

    def start(self):
        """Import what dead listeners left, then listen and commit in the background."""
        with self.app.app_context():
            self.offset = default_offset()
            self._open_folder()
            adopted = self._adopt_orphans()
            if adopted:
                log.info("Importing %d instances a previous listener acknowledged", len(adopted))
                self._commit(adopted)
        # pynetdicom logs every identifier at INFO, for every query.
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        # A C-GET or C-MOVE sends stored files as they are (send_stored_files).
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        quiet_standard_handlers()
        self.ae = make_ae(self.ae_title, self.max_associations, self.timeout)
        try:
            self.server = self.ae.make_server((self.host, self.port), ae_title=self.ae_title,
                                              evt_handlers=self._handlers(),
                                              server_class=_NoDelayServer)
        except OSError:
            self._close_folder()  # nothing was received: nothing to keep
            raise
        self.ae._servers.append(self.server)  # as start_server does: shutdown() removes it
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="dicom-listener",
                         daemon=True).start()
        self.committer = threading.Thread(target=self._run_committer, name="dicom-committer",
                                          daemon=True)
        self.committer.start()
        log.info("DICOM listener %s on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self):
        """Stop listening, abort open associations, import what was acknowledged."""
        if self.server is not None:
            self.server.shutdown()
            for assoc in list(self.ae.active_associations):
                assoc.abort()
            self.server = None
        self.stopping.set()
        if self.committer is not None:
            self.committer.join()
            self.committer = None
        with self.lock:
            left = [item for item in self.received if not item.done]
        if left:  # the database refused until the end: the next start imports them
            self.log.close()
            os.close(self.lock_fd)
            self.lock_fd = None
        else:
            self._close_folder()

    def _close_folder(self):
        """Remove this listener's folder and release its lock."""
        if self.lock_fd is None:
            return
        self.log.close()
        with self.app.app_context():
            shutil.rmtree(storage.dicom_listener_path(self.id), ignore_errors=True)
        os.close(self.lock_fd)
        self.lock_fd = None

    def _handlers(self):
        return [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_C_GET, self._on_get), (evt.EVT_C_MOVE, self._on_move)]

    def _contexts_for(self, session):
        """The supported contexts a node's services need: the others are rejected in
        negotiation (storage stays for ``get``: its instances come over C-STORE)."""
        kept = []
        for context in self.ae.supported_contexts:
            uid = context.abstract_syntax
            if uid == Verification:
                wanted = "echo" in session.allow
            elif uid in QR_MODELS:
                wanted = QR_MODELS[uid] in session.allow
            else:
                wanted = bool({"store", "get"} & session.allow)
            if wanted:
                kept.append(context)
        return kept

    # --- associations -------------------------------------------------------------------

    def _session_for(self, calling, address):
        """The Session of a calling AE title at ``address``, or None (rejected)."""
        with self.app.app_context():
            node = db.session.get(DicomNode, calling)
            if node is not None:
                node = Session(node.ae_title, node.domain, frozenset(node.allow)), node.host
        if node is not None:
            session, host = node
            if host and not host_matches(host, address):
                log.warning("DICOM association of %r from %s refused: its node is at %s",
                            calling, address, host)
                return None
            return session
        if self.open_domain:
            return Session(calling, self.open_domain, OPEN_SERVICES)
        log.warning("DICOM association of unknown AE %r from %s refused", calling, address)
        return None

    def _on_requested(self, event):
        assoc = event.assoc
        calling = (assoc.requestor.primitive.calling_ae_title or "").strip()
        session = self._session_for(calling, assoc.requestor.address)
        if session is None:
            assoc.acse.send_reject(*REJECT_CALLING_AE)
            assoc.kill()  # as pynetdicom's own rejections: the DUL sends the PDU, then stops
            return
        self.sessions[assoc] = session
        assoc.acceptor.supported_contexts = self._contexts_for(session)
        # pynetdicom's DUL thread sleeps this long whenever it finds nothing to do (1 ms by
        # default): a store waits for it up to twice. Shorter polls cost some CPU while an
        # association is open and save ~1 ms an instance.
        assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        prompt_reactor(assoc)

    def _allowed(self, event, service):
        session = self.sessions.get(event.assoc)
        return session if session is not None and service in session.allow else None

    def _on_echo(self, event):
        return SUCCESS if self._allowed(event, "echo") else NOT_AUTHORIZED

    # --- C-STORE ------------------------------------------------------------------------

    def _on_store(self, event):
        session = self._allowed(event, "store")
        if session is None:
            return _status(NOT_AUTHORIZED, "This node may not store.")
        request = event.request
        data = part10(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                      str(event.context.transfer_syntax),
                      event.encoded_dataset(include_meta=False))
        try:
            keys, series = self._reserve(session.domain, data)
        except DomainConflictError as exc:
            return _status(NOT_AUTHORIZED, str(exc))
        except InvalidInstanceError as exc:
            return _status(DOES_NOT_MATCH, str(exc))
        except DicomImportError as exc:
            return _status(CANNOT_UNDERSTAND, str(exc))
        record = None
        try:
            record = self.log.append(session.domain, data)
            self.log.sync(record)
        except OSError as exc:
            log.error("Cannot stage a received instance: %s", exc)
            if record is not None:
                self.log.done([record])
            self._release(keys.series_uid)
            return _status(OUT_OF_RESOURCES, "The instance cannot be stored.")
        with self.lock:
            self.received.append(Received(session.domain, record, keys, series))
        return SUCCESS

    def _conflict(self, uid, domain):
        return DomainConflictError(f"The series {uid} exists in another domain.")

    def _reserve(self, domain, data):
        """Check one instance for ``domain`` and count it as pending; return its
        InstanceKeys and, if its series is new, its series record (else None).

        Raises
        ------
        DicomImportError
            NotDicomError, BrokenDicomError, InvalidInstanceError, DomainConflictError.
        """
        keys = read_keys(io.BytesIO(data), len(data))
        uid = keys.series_uid
        with self.lock:
            pending = self.pending.get(uid)
            if pending is not None and pending[0] != domain:
                raise self._conflict(uid, domain)
            if pending is not None or self.known.get(uid) == domain:
                self._count(uid, domain)
                return keys, None
        with self.app.app_context():
            stored = db.session.execute(
                db.select(Series.domain).where(Series.series_uid == uid)).scalar()
        if stored is not None and stored != domain:
            raise self._conflict(uid, domain)
        series = None
        if stored is None:
            # A new series: its batch needs this instance parsed whole; refuse it now if
            # that fails, not after the acknowledgement (and pass the batch the result).
            record = extract_record(read_dataset(io.BytesIO(data), len(data)), self.offset)
            if record.series_uid != uid:
                raise InvalidInstanceError("The DICOM file cannot be parsed consistently.")
            series = record.series
        with self.lock:
            pending = self.pending.get(uid)
            if pending is not None and pending[0] != domain:
                raise self._conflict(uid, domain)
            if stored is not None:
                self._remember(uid, stored)
            self._count(uid, domain)
        return keys, series

    def _count(self, uid, domain, step=1):
        entry = self.pending.setdefault(uid, [domain, 0])
        entry[1] += step
        if entry[1] <= 0:
            del self.pending[uid]

    def _release(self, uid):
        with self.lock:
            self._count(uid, None, -1)

    def _remember(self, uid, domain):
        self.known[uid] = domain
        self.known.move_to_end(uid)
        if len(self.known) > KNOWN_MAX:
            self.known.popitem(last=False)

    # --- C-FIND -------------------------------------------------------------------------

    def _on_find(self, event):
        session = self._allowed(event, "find")
        if session is None:
            yield _status(NOT_AUTHORIZED, "This node may not query."), None
            return
        try:
            identifier = event.identifier
            level, keys = _request(identifier, event.request.AffectedSOPClassUID)
            with self.app.app_context():
                matches, _ignored = query.find(level, keys, [session.domain])
        except query.QueryError as exc:
            yield _status(DOES_NOT_MATCH, str(exc)), None
            return
        except Exception as exc:  # an identifier pydicom cannot decode
            log.warning("C-FIND identifier refused: %s", exc)
            yield _status(CANNOT_UNDERSTAND, "The identifier cannot be decoded."), None
            return
        for match in matches:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, self._answer(level, keys, match)

    def _answer(self, level, keys, match):
        """The response identifier of one match: the requested keys (empty when unknown),
        the level's unique key and the higher levels' UIDs."""
        answer = Dataset()
        wanted = list(keys)
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID")[:("PATIENT", "STUDY", "SERIES", "IMAGE").index(level) + 1]:
            if keyword not in wanted and (keyword == UNIQUE_KEYS[level] or match.get(keyword)):
                wanted.append(keyword)
        texts = []
        for keyword in wanted:
            if keyword == "RetrieveAETitle":
                value = self.ae_title
            else:
                value = match.get(keyword)
            if value is None:
                value = ""
            elif isinstance(value, (list, tuple)):
                value = [str(v) for v in value]
                texts.extend(value)
            elif isinstance(value, str):
                texts.append(value)
            try:
                setattr(answer, keyword, value)
            except (ValueError, TypeError):
                setattr(answer, keyword, "")
        if any(not text.isascii() for text in texts):
            answer.SpecificCharacterSet = "ISO_IR 192"
        answer.QueryRetrieveLevel = level
        return answer

    # --- C-GET and C-MOVE ----------------------------------------------------------------

    def _retrieve(self, event, session, action, destination=None):
        """``{path: (SOP class, transfer syntax, SOP instance UID)}`` of the instances an
        identifier retrieves; QueryError if malformed. The retrieve is audited
        (``action``: dicom-get or dicom-move) before anything is sent."""
        try:
            identifier = event.identifier
        except Exception:  # undecodable
            raise query.QueryError("The identifier cannot be decoded.") from None
        level, keys = _request(identifier, event.request.AffectedSOPClassUID)
        unique = UNIQUE_KEYS[level]
        uids = [v for v in keys.get(unique, "").split("\\") if v]
        if not uids:
            raise query.QueryError(f"A {level} level retrieve needs {unique}.")
        domains = [session.domain]
        found = {}
        with self.app.app_context():
            if level == "PATIENT":
                selections = [{"study_uid": m["StudyInstanceUID"]} for patient in uids
                              for m in query.find("STUDY", {"PatientID": patient,
                                                            "StudyInstanceUID": ""}, domains)[0]]
            else:
                for uid in uids:
                    if "*" in uid or "?" in uid or not UID_RE.match(uid) or len(uid) > 64:
                        raise query.QueryError(f"{unique} holds an invalid UID {uid!r}.")
                name = {"STUDY": "study_uid", "SERIES": "series_uid",
                        "IMAGE": "sop_instance_uid"}[level]
                selections = [{name: uid} for uid in uids]
            for selection in selections:
                for row, path in query.instance_files(domains, **selection):
                    found.setdefault(path, (row.sop_class_uid, row.transfer_syntax_uid,
                                            row.sop_instance_uid))
            requestor = event.assoc.requestor
            audit.record(action, level.lower(), ",".join(uids)[:255], detail={
                "callingAeTitle": requestor.ae_title, "address": requestor.address,
                "domain": session.domain, "instances": len(found),
                **({"destination": destination} if destination else {})})
            db.session.commit()  # no answer carries it: committed before a file is sent
        return found

    def _on_get(self, event):
        session = self._allowed(event, "get")
        if session is None:
            yield 1
            yield _status(NOT_AUTHORIZED, "This node may not retrieve."), None
            return
        try:
            found = self._retrieve(event, session, "dicom-get")
        except query.QueryError as exc:
            yield 1
            yield _status(DOES_NOT_MATCH, str(exc)), None
            return
        send_stored_files(event.assoc)
        yield from self._send(event, found)

    def _send(self, event, found):
        if len(found) > MAX_SUBOPERATIONS:
            yield 1
            yield _status(OUT_OF_RESOURCES, "Too many instances for one retrieve."), None
            return
        yield len(found)
        for path, (sop_class, syntax, sop_instance) in found.items():
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, StoredFile(path, sop_class, syntax, sop_instance)

    def _on_move(self, event):
        session = self._allowed(event, "move")
        destination = (event.move_destination or "").strip()
        with self.app.app_context():
            node = db.session.get(DicomNode, destination) if destination else None
            node = None if node is None else (node.host, node.port)
        if session is None or node is None or not node[0] or not node[1]:
            # Unknown, or known but not addressable: 0xA801 (PS3.4 C.4.2.1.5).
            yield None, None
            return
        try:
            found = self._retrieve(event, session, "dicom-move", destination)
        except query.QueryError as exc:
            yield node[0], node[1]
            yield 1
            yield _status(DOES_NOT_MATCH, str(exc)), None
            return
        pairs = sorted({(sop_class, syntax) for sop_class, syntax, _uid in found.values()
                        if sop_class and syntax})
        contexts = [build_context(sop_class, syntax)
                    for sop_class, syntax in pairs[:MAX_CONTEXTS]]
        options = {"evt_handlers": [(evt.EVT_CONN_OPEN, _no_delay),
                                    (evt.EVT_CONN_OPEN, _sends_stored_files)]}
        if contexts:
            options["contexts"] = contexts
        yield node[0], node[1], options
        yield from self._send(event, found)

    # --- staging ------------------------------------------------------------------------

    def _open_folder(self):
        """Create this listener's folder and hold its lock (under a temporary name first,
        so no other listener takes it for a dead one's); its staging log lives there."""
        base = storage.dicom_listener_path()
        os.makedirs(base, exist_ok=True)
        temporary = storage.dicom_listener_path(self.id + ".new")
        os.makedirs(temporary)
        self.lock_fd = os.open(storage.dicom_listener_path(self.id + ".new", "lock"),
                               os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        os.rename(temporary, storage.dicom_listener_path(self.id))
        storage.fsync_dir(base)
        storage.fsync_dir(os.path.dirname(base))
        self.log = staging_log.StagingLog(storage.dicom_listener_path(self.id))

    def _adopt_orphans(self):
        """Append what dead listeners (lock free) acknowledged and the index does not have
        to this listener's log, then remove their folders; return it as Received items,
        counted as pending."""
        base = storage.dicom_listener_path()
        adopted = []
        for name in sorted(os.listdir(base)):
            if name == self.id or name == "refused":
                continue
            try:
                folder = storage.dicom_listener_path(name)
                fd = os.open(storage.dicom_listener_path(name, "lock"), os.O_RDWR)
            except (OSError, storage.UnsafePathError):
                continue  # not a listener folder (or one being created right now)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its listener runs
                records = []
                for found in staging_log.pending_records(folder):
                    item = self._adopt(found.domain, found.read())
                    if item is not None:
                        records.append(item.record)
                        adopted.append(item)
                for record in records:  # the first flush covers them all
                    self.log.sync(record)
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)
        storage.fsync_dir(base)
        return adopted

    def _adopt(self, domain, data):
        """Append one instance of a dead listener to this listener's log (not synced)."""
        try:
            keys = read_keys(io.BytesIO(data), len(data))
        except DicomImportError:
            return None  # was acknowledged after this check: never acknowledged
        item = Received(domain, self.log.append(domain, data), keys)
        with self.lock:
            self._count(keys.series_uid, domain)
        return item

    # --- the committer ------------------------------------------------------------------

    def _run_committer(self):
        with self.app.app_context():
            while True:
                stopping = self.stopping.wait(self.interval)
                with self.lock:
                    items, self.received = self.received, []
                if not items and stopping:
                    return
                try:
                    self._commit(items)
                    self.log.prepare()
                except Exception:  # the database may be back on the next tick
                    log.exception("Committing received DICOM instances failed; will retry")
                    db.session.rollback()
                    with self.lock:
                        self.received[:0] = [item for item in items if not item.done]
                    if not stopping:
                        self.stopping.wait(RETRY_SECONDS)
                    else:
                        return  # their files stay staged: the next start imports them
                finally:
                    db.session.remove()

    def _commit(self, items):
        """Import acknowledged instances: one batch per domain (at most BATCH_MAX each);
        a batch refused as a whole (a series another domain took meanwhile) is retried
        series by series, and what still fails is set aside in ``refused/``."""
        by_domain = {}
        for item in items:
            by_domain.setdefault(item.domain, []).append(item)
        for domain, group in by_domain.items():
            for start in range(0, len(group), BATCH_MAX):
                chunk = group[start:start + BATCH_MAX]
                try:
                    self._commit_batch(domain, chunk)
                except DicomImportError:
                    by_series = {}
                    for item in chunk:
                        by_series.setdefault(item.series_uid, []).append(item)
                    for series_items in by_series.values():
                        try:
                            self._commit_batch(domain, series_items)
                        except DicomImportError as exc:
                            self._refuse(series_items, exc)

    def _commit_batch(self, domain, items):
        with ImportBatch(domain, self.offset) as batch:
            for item in items:
                if item.record.path is not None:  # a file of its own: linked, not copied
                    batch.add_link(item.record.path, keys=item.keys, series=item.series)
                else:
                    batch.add_bytes(self.log.read(item.record), keys=item.keys,
                                    series=item.series)
            batch.commit()
        with self.lock:
            for item in items:
                item.done = True
                self._count(item.series_uid, domain, -1)
                self._remember(item.series_uid, domain)
        self.log.done([item.record for item in items])

    def _refuse(self, items, exc):
        """Keep acknowledged instances the index refused in ``refused/`` for an admin."""
        folder = storage.dicom_listener_path("refused")
        os.makedirs(folder, exist_ok=True)
        for item in items:
            path = storage.dicom_listener_path("refused", f"{self.id}-{item.record.ticket:010d}.dcm")
            log.error("A received instance cannot be imported into %r (%s); kept as %s",
                      item.domain, exc, path)
            with storage.atomic_file(path) as fh:
                fh.write(self.log.read(item.record))
            with self.lock:
                if not item.done:
                    self._count(item.series_uid, item.domain, -1)
                item.done = True
        storage.fsync_dir(folder)
        self.log.done([item.record for item in items])


def run_listener(app, host=None, port=None):
    """Serve until SIGTERM or SIGINT (``flask --app app dicom-listener``)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_args: stop.set())
    listener = Listener(app, host, port).start()
    print(f"DICOM listener {listener.ae_title} on {listener.host}:{listener.port}", flush=True)
    try:
        # With a timeout: a signal delivered to another thread (pynetdicom's) only runs its
        # handler once the main thread wakes, and an untimed wait may never wake.
        while not stop.wait(0.5):
            pass
    finally:
        # A bounded stop: what was acknowledged is staged durably, and a commit cut short
        # leaves its staged links for the next start, so exiting is always safe.
        watchdog = threading.Timer(STOP_GRACE_SECONDS, _exit_now)
        watchdog.daemon = True
        watchdog.start()
        listener.stop()
        watchdog.cancel()
    # Everything acknowledged is imported or staged: the process ends here. Waiting for the
    # interpreter's shutdown would wait for the connection threads of callers that never
    # associated, up to their timeout (a stop once overran 30 s in the full suite).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_now():
    # No logging here: a thread stuck while holding a handler's lock would make this wait
    # too. One raw write to stderr, then out.
    threads = ", ".join(t.name for t in threading.enumerate())
    message = (f"The DICOM listener did not stop within {STOP_GRACE_SECONDS} s "
               f"(threads: {threads}); exiting\n")
    try:
        os.write(2, message.encode("utf-8", "replace"))
    finally:
        os._exit(0)
