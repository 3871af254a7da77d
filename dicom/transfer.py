"""The volume WebSocket of the image server (API.md 3.19): messages, priorities, the loop.

Every message is UTF-8 JSON, one 0x0A byte, then an optional binary payload. A socket
carries several transfers (one per open viewer); each sends the slices of its volume in
priority order (higher first; for equal priorities the latest ``SET_PRIORITY`` first, and
within one request ascending) as CIRCUS's ``PriorityIntegerQueue`` with
``lifoForSamePriority``. Transfers take turns, one slice each; a transfer ends silently
when its last slice is sent. Messages that cannot be understood are ignored, as CIRCUS
does, and never end the socket. A slice goes out as one frame written straight from the
cached volume (``message_sender``).
"""
import json
import logging
import socket
import struct
import threading

from simple_websocket import ConnectionClosed

from dicom import volumes

log = logging.getLogger(__name__)

END_OF_JSON = b"\n"
DECODE_AHEAD = 4  # slices of a transfer queued for decoding beyond the one being sent
IDLE_WAIT = 1.0  # seconds an idle socket blocks on receive before checking for shutdown
CLOSE_WAIT = 1.0  # seconds a stopping socket waits for the client's close answer
DECODE_TIMEOUT = 120  # seconds a slice may take before its transfer is given up
ABNORMAL_CLOSURE = 1006  # RFC 6455 close code: the connection was lost
MESSAGE_TYPES = {"BEGIN_TRANSFER", "SET_PRIORITY", "PAUSE_TRANSFER", "RESUME_TRANSFER",
                 "ABORT_TRANSFER", "TRANSFER_IMAGE"}

# Set when the worker process is stopping (gunicorn.conf.py): sockets then close with 1001.
stopping = threading.Event()


def pack(data, payload=b""):
    """One message: JSON, 0x0A, payload."""
    return pack_head(data) + bytes(payload)


def pack_head(data):
    """The part of a message before its payload: JSON, 0x0A."""
    return json.dumps(data, separators=(",", ":")).encode("utf-8") + END_OF_JSON


def unpack(message):
    """The JSON part of a message as a dict with a known ``messageType``, else None."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    end = message.find(END_OF_JSON)
    if end < 0:
        return None
    try:
        data = json.loads(message[:end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("messageType") not in MESSAGE_TYPES:
        return None
    return data


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class PriorityQueue:
    """Integers by priority: CIRCUS's ``PriorityIntegerQueue({lifoForSamePriority: true})``.

    ``entries`` is a list of ``[priority, fragments]`` in ascending priority; fragments are
    sets taken from the last one, smallest value first.
    """

    def __init__(self, values=()):
        self.entries = []
        self.values = set()
        if values:
            self.append(values, 0)

    def append(self, values, priority=0):
        values = set(values)
        self.values |= values
        index = next((i for i, e in enumerate(self.entries) if e[0] >= priority),
                     len(self.entries))
        if index == len(self.entries) or self.entries[index][0] != priority:
            self.entries.insert(index, [priority, []])
        entry = self.entries[index]
        for _, fragments in self.entries[index + 1:]:
            for fragment in fragments:
                values -= fragment
        if values:
            for _, fragments in self.entries[:index]:
                for fragment in fragments:
                    fragment -= values
            for fragment in entry[1]:
                fragment -= values
            entry[1].append(values)
        self._cleanup()

    def _cleanup(self):
        for entry in self.entries:
            entry[1] = [f for f in entry[1] if f]
        self.entries = [e for e in self.entries if e[1]]

    def shift(self):
        """The next value (None when empty)."""
        if not self.entries:
            return None
        fragments = self.entries[-1][1]
        value = min(fragments[-1])
        fragments[-1].discard(value)
        self.values.discard(value)
        self._cleanup()
        return value

    def peek(self, count):
        """Up to ``count`` values in the order ``shift`` would give them."""
        found = []
        for _, fragments in reversed(self.entries):
            for fragment in reversed(fragments):
                for value in sorted(fragment)[:count - len(found)]:
                    found.append(value)
                if len(found) >= count:
                    return found
        return found

    def clear(self):
        self.entries, self.values = [], set()

    def __len__(self):
        return len(self.values)


class Transfer:
    """One viewer's volume: image ``i`` of the request is ``volume`` slice ``zs[i]``."""

    def __init__(self, transfer_id, volume, zs):
        self.id = transfer_id
        self.volume = volume
        self.zs = zs
        self.queue = PriorityQueue(range(len(zs)))
        self.paused = False

    def set_priority(self, target, priority):
        targets = [target] if _is_int(target) else target
        if not isinstance(targets, list) or not _is_number(priority) \
                or not all(_is_int(t) for t in targets):
            return
        wanted = self.queue.values.intersection(targets)  # outside the volume: ignored
        if wanted:
            self.queue.append(wanted, priority)


class Agent:
    """The transfers of one socket and the turn-taking between them."""

    def __init__(self, send, begin):
        self.send = send  # (head bytes, payload buffer) -> None (may block: the client's pace)
        self.begin = begin  # (seriesUid, pvd) -> (CachedVolume, zs) or None when refused
        self.transfers = {}
        self.turn = 0

    def handle(self, message):
        data = unpack(message)
        if data is None:
            return
        kind, transfer_id = data["messageType"], data.get("transferId")
        if not isinstance(transfer_id, (str, int)) or isinstance(transfer_id, bool):
            return
        if kind == "BEGIN_TRANSFER":
            self._begin(transfer_id, data)
            return
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            return  # unknown, refused or already finished: ignored as CIRCUS does
        if kind == "SET_PRIORITY":
            transfer.set_priority(data.get("target"), data.get("priority"))
        elif kind == "PAUSE_TRANSFER":
            transfer.paused = True
        elif kind == "RESUME_TRANSFER":
            transfer.paused = False
        elif kind == "ABORT_TRANSFER":
            del self.transfers[transfer_id]

    def _begin(self, transfer_id, data):
        series_uid, pvd = data.get("seriesUid"), data.get("partialVolumeDescriptor")
        if transfer_id in self.transfers or not isinstance(series_uid, str):
            return
        opened = self.begin(series_uid, pvd)
        if opened is None:
            log.warning("Transfer %s of %s refused (token, domain, series or descriptor)",
                        transfer_id, series_uid)
            return
        volume, zs = opened
        self.transfers[transfer_id] = Transfer(transfer_id, volume, zs)

    def busy(self):
        return any(not t.paused for t in self.transfers.values())

    def step(self):
        """Send one slice of the next unpaused transfer (in turn)."""
        active = [t for t in self.transfers.values() if not t.paused]
        if not active:
            return
        transfer = active[self.turn % len(active)]
        self.turn += 1
        index = transfer.queue.shift()
        if index is None:
            del self.transfers[transfer.id]
            return
        volume = transfer.volume
        volume.request([transfer.zs[i] for i in [index, *transfer.queue.peek(DECODE_AHEAD)]])
        try:
            row = volume.get(transfer.zs[index], DECODE_TIMEOUT)
        except volumes.VolumeError as exc:
            log.warning("Transfer %s of %s stopped: %s", transfer.id, volume.series_uid, exc)
            del self.transfers[transfer.id]
            return
        if not transfer.queue:
            del self.transfers[transfer.id]  # ends silently: the client counts slices
        self.send(pack_head({"messageType": "TRANSFER_IMAGE", "transferId": transfer.id,
                             "imageIndex": index}), row)


def serve(ws, begin):
    """Run one socket until the client closes it or the worker stops.

    ``ws`` is a simple-websocket connection (``receive(timeout)``, ``send``); an idle
    socket blocks in ``receive``, a busy one checks for messages between slices.
    """
    agent = Agent(message_sender(ws), begin)
    while not stopping.is_set():
        busy = agent.busy()
        message = ws.receive(timeout=0 if busy else IDLE_WAIT)
        if message is not None:
            agent.handle(message)
        elif busy:
            agent.step()
    ws.close(reason=1001, message="Server is shutting down")
    # The reader thread ends with the client's answer; a client that does not answer must
    # not keep the stopping process alive.
    ws.thread.join(CLOSE_WAIT)
    if ws.thread.is_alive():
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def message_sender(ws):
    """``send(head, payload)`` for a simple-websocket server connection: each message one
    unfragmented, unmasked binary frame, written by one ``sendmsg`` of the frame header,
    the head and the payload's own buffer (a slice of the cached volume, never copied).

    ``ws.send`` goes through wsproto, which copies a payload five times (bytearray, the
    extension's bytes, header + payload, bytes + bytearray): for 512 KB slices that cost
    more than sending them. A complete frame leaves wsproto's state as it was. With a
    negotiated extension (never: ``routes/rs.py`` declines permessage-deflate) or a
    connection of another shape, messages go through ``ws.send``.
    """
    try:
        extensions = ws.ws.connection._proto.extensions
        plain = ws.is_server and not any(e.enabled() for e in extensions)
    except AttributeError:
        plain = False
    if not plain:
        return lambda head, payload: ws.send(head + bytes(payload))
    sock = ws.sock = SerialSocket(ws.sock)

    def send(head, payload):
        if not ws.connected:
            raise ConnectionClosed(ws.close_reason, ws.close_message)
        body = memoryview(payload).cast("B")
        try:
            sock.sendmsg_all([frame_header(len(head) + body.nbytes) + head, body])
        except OSError as exc:  # the client went away: as simple-websocket says it
            raise ConnectionClosed(ABNORMAL_CLOSURE, str(exc)) from None
    return send


def frame_header(length):
    """RFC 6455 header of a final, unmasked binary frame of ``length`` payload bytes."""
    if length < 126:
        return struct.pack("!BB", 0x82, length)
    if length < 1 << 16:
        return struct.pack("!BBH", 0x82, 126, length)
    return struct.pack("!BBQ", 0x82, 127, length)


class SerialSocket:
    """A connection's socket whose writes never interleave: simple-websocket's reader
    thread writes pings, pongs and the close answer while the socket's thread writes
    slices, and the kernel lets another write in while a large one waits for buffer
    space, which would cut a frame. Everything else is the socket's own."""

    def __init__(self, sock):
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data):
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    def sendmsg_all(self, buffers):
        """Write every byte of ``buffers`` (a list of bytes-like objects), in order."""
        buffers = [memoryview(b).cast("B") for b in buffers]
        with self._lock:
            while buffers:
                sent = self._sock.sendmsg(buffers)
                while buffers and sent >= buffers[0].nbytes:
                    sent -= buffers.pop(0).nbytes
                if sent:
                    buffers[0] = buffers[0][sent:]

    def __getattr__(self, name):
        return getattr(self._sock, name)
