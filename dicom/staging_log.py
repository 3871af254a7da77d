"""The DICOM listener's staging log: each instance it accepts, durable before it is
acknowledged, until the index has it (dicom/net.py).

A listener appends what it accepts to its log, a few segment files in its folder, and
acknowledges an instance once a flush covers it. Appends are serialized, so a flush covers
a prefix of the log, and one ``fdatasync`` covers every append written before it started:
the stores of all associations waiting at once share it (group commit). A segment is
zero-filled and synced when it is created, so an append overwrites allocated blocks and
its flush writes data only: per instance no file is created and no folder changes (a new
file's fsync and its folder's cost ~4x as much, and stall on each other's writeback).

A segment holds a header (magic, generation) and then records (magic, generation,
sequence, domain and data lengths, CRC-32, domain, data). Once the index has a record it is
marked done (its magic; not synced: a mark lost in a crash only imports the instance
again). A segment whose records are all done is reused under the next generation, its new
header synced first, so its old records can never be read again.

A large instance (over ``LARGE_BYTES``: a CT slice) is written to a file of its own instead,
``<domain key>/<sequence>.dcm`` beside a file ``domain`` naming its domain, synced with its
folder: its data is then written once, the index links the file into place rather than
copying it out of the log, and the file is removed when done.

``pending_records(folder)`` lists what a dead listener's log holds: each record not marked
done, in each segment up to the first that does not check (an append that was never
acknowledged), and each file of its own.
"""
import hashlib
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass

import storage

log = logging.getLogger(__name__)

SEGMENT_BYTES = 8 * 1024 * 1024
LARGE_BYTES = 256 * 1024  # larger instances get a file of their own
HEADER_BYTES = 64  # a segment's header; its records follow
ZERO_CHUNK = 1024 * 1024
_SEGMENT = struct.Struct("<8sQI")  # magic, generation, CRC-32 of the generation
_SEGMENT_MAGIC = b"CIRCUSSL"
_RECORD = struct.Struct("<4sQQHII")  # magic, generation, sequence, domain len, data len, CRC
LIVE, DONE = b"RECD", b"DONE"
PREFIX = "segment-"
DOMAIN_FILE = "domain"


class StagingLogBroken(OSError):
    """Raised once a flush of the log has failed: what it covered may be lost, so no
    store is acknowledged any more (until the listener is restarted)."""


class Segment:
    """One segment file, open for the life of the log."""

    def __init__(self, path, fd, generation):
        self.path = path
        self.fd = fd
        self.generation = generation
        self.tail = HEADER_BYTES
        self.pending = 0  # records not yet done


@dataclass(eq=False)
class Record:
    """One appended instance: where its data is (a segment, or a file of its own at
    ``path``) and which flush makes it durable (0: durable already)."""
    segment: Segment | None
    offset: int
    domain: str
    size: int
    ticket: int
    path: str | None = None


@dataclass(frozen=True)
class Found:
    """A record read back from a segment file (``pending_records``)."""
    sequence: int
    domain: str
    path: str
    offset: int  # of its data
    size: int

    def read(self):
        with open(self.path, "rb") as fh:
            return _pread_exactly(fh.fileno(), self.size, self.offset)


def _segment_header(generation):
    header = _SEGMENT.pack(_SEGMENT_MAGIC, generation, zlib.crc32(struct.pack("<Q", generation)))
    return header.ljust(HEADER_BYTES, b"\0")


def _record_header(magic, generation, sequence, name, data):
    crc = zlib.crc32(data, zlib.crc32(name, zlib.crc32(struct.pack(
        "<QQHI", generation, sequence, len(name), len(data)))))
    return _RECORD.pack(magic, generation, sequence, len(name), len(data), crc)


def _pwrite_all(fd, buffers, offset):
    """Write ``buffers`` at ``offset``: one ``pwritev`` in the usual case, the rest of a
    short write after it."""
    views = [memoryview(buffer) for buffer in buffers]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _pread_exactly(fd, size, offset):
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"The staging log is shorter than its record ({len(data)} < {size}).")
    return data


class StagingLog:
    """The staging log of one listener, in ``folder`` (which the listener holds locked).

    ``append`` then ``sync`` before acknowledging; ``read`` for the index; ``done`` once
    the index has them; ``prepare`` between commits (a spare segment ahead of need)."""

    def __init__(self, folder, segment_bytes=SEGMENT_BYTES, large_bytes=LARGE_BYTES):
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.large_bytes = min(large_bytes, segment_bytes // 2)
        self.domain_folders = {}  # domain -> the folder of its files of their own
        self.cond = threading.Condition()
        self.segments = []
        self.active = None
        self.dirty = set()  # segments written since the last flush started
        self.written = 0  # tickets handed out (one per append)
        self.flushed = 0  # every ticket up to this one is durable
        self.flushing = False
        self.broken = None  # the error of a failed flush
        self.counter = 0  # segment file names

    # --- appending ------------------------------------------------------------------------

    def append(self, domain, data):
        """Write one instance to the log (not yet durable: ``sync``); return its Record."""
        if len(data) > self.large_bytes:
            return self._append_file(domain, data)
        name = domain.encode()
        size = _RECORD.size + len(name) + len(data)
        with self.cond:
            if self.broken is not None:
                raise self.broken
            segment = self.active
            if segment is None or segment.tail + size > self.segment_bytes:
                segment = self._next_segment()
            ticket = self.written + 1
            _pwrite_all(segment.fd, (_record_header(LIVE, segment.generation, ticket, name, data),
                                     name, data), segment.tail)
            record = Record(segment, segment.tail, domain, len(data), ticket)
            segment.tail += size
            segment.pending += 1
            self.written = ticket
            self.dirty.add(segment)
            return record

    def _append_file(self, domain, data):
        """A large instance: a file of its own, synced now with its folder."""
        with self.cond:
            if self.broken is not None:
                raise self.broken
            self.written += 1  # a sequence number only: no flush waits for it
            path = os.path.join(self._domain_folder(domain), f"{self.written:010d}.dcm")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _pwrite_all(fd, [data], 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        storage.fsync_dir(os.path.dirname(path))
        return Record(None, 0, domain, len(data), 0, path)

    def _domain_folder(self, domain):
        """The folder of the files of their own of ``domain``, created durably with the
        domain's name in its file ``domain``. Under ``cond``."""
        folder = self.domain_folders.get(domain)
        if folder is None:
            folder = os.path.join(self.folder, hashlib.sha1(domain.encode()).hexdigest()[:20])
            os.makedirs(folder, exist_ok=True)
            with storage.atomic_file(os.path.join(folder, DOMAIN_FILE)) as fh:
                fh.write(domain.encode())
            storage.fsync_dir(folder)
            storage.fsync_dir(self.folder)
            self.domain_folders[domain] = folder
        return folder

    def _new_name(self):
        self.counter += 1
        return os.path.join(self.folder, f"{PREFIX}{self.counter:08d}")

    def _next_segment(self):
        """Make a free segment (or a new one) the active one. Under ``cond``."""
        free = next((s for s in self.segments if s.pending == 0 and s is not self.active),
                    None)
        if free is None:
            free = self._create(self._new_name())
            self.segments.append(free)
        else:
            # The old records must never be read again before new ones follow them.
            free.generation += 1
            os.pwrite(free.fd, _segment_header(free.generation), 0)
            os.fdatasync(free.fd)
            free.tail = HEADER_BYTES
        self.active = free
        return free

    def _create(self, path):
        """A zero-filled, synced segment file (its folder synced too)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            zeros = bytes(ZERO_CHUNK)
            _pwrite_all(fd, [_segment_header(1)], 0)
            for offset in range(HEADER_BYTES, self.segment_bytes, ZERO_CHUNK):
                _pwrite_all(fd, [zeros[:min(ZERO_CHUNK, self.segment_bytes - offset)]], offset)
            os.fsync(fd)
            storage.fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return Segment(path, fd, 1)

    def prepare(self):
        """Create a spare segment once the log is in use and none is free, so an append
        rarely waits for a new segment's zero-fill."""
        with self.cond:
            active = self.active
            if active is None or any(s.pending == 0 and s is not active
                                     for s in self.segments):
                return
            path = self._new_name()
        segment = self._create(path)
        with self.cond:
            self.segments.append(segment)

    # --- durability -----------------------------------------------------------------------

    def sync(self, record):
        """Return once ``record`` is durable. One thread flushes for all that wait (every
        record written before its flush started); the others wait for it.

        Raises
        ------
        StagingLogBroken
            When this or an earlier flush failed.
        """
        with self.cond:
            while True:
                if self.broken is not None:
                    raise self.broken
                if self.flushed >= record.ticket:
                    return
                if self.flushing:
                    self.cond.wait()
                    continue
                self.flushing = True
                target, segments = self.written, list(self.dirty)
                self.dirty.clear()
                self.cond.release()
                error = None
                try:
                    for segment in segments:
                        os.fdatasync(segment.fd)
                except OSError as exc:
                    error = exc
                finally:
                    self.cond.acquire()
                    self.flushing = False
                    self.cond.notify_all()
                if error is not None:
                    # The kernel may have dropped what failed to write: nothing it
                    # covered can be acknowledged, now or after a later flush.
                    log.error("Flushing the DICOM staging log failed: %s", error)
                    self.broken = StagingLogBroken(f"The staging log cannot be flushed: {error}")
                else:
                    self.flushed = max(self.flushed, target)

    # --- the index's side -----------------------------------------------------------------

    def read(self, record):
        """The data of ``record``."""
        if record.path is not None:
            with open(record.path, "rb") as fh:
                return _pread_exactly(fh.fileno(), record.size, 0)
        header = _RECORD.size + len(record.domain.encode())
        return _pread_exactly(record.segment.fd, record.size, record.offset + header)

    def done(self, records):
        """Mark records done (the index has them, or they were set aside): their segments
        can be reused, a file of its own is removed."""
        for record in records:
            if record.path is not None:
                _unlink_quietly(record.path)
                continue
            try:
                os.pwrite(record.segment.fd, DONE, record.offset)
            except OSError:  # not fatal: the record would only be imported again
                log.warning("Cannot mark a staging log record done in %s", record.segment.path)
        with self.cond:
            for record in records:
                if record.segment is not None:
                    record.segment.pending -= 1

    def close(self):
        """Close the segment files (they stay on disk)."""
        with self.cond:
            segments, self.segments, self.active = self.segments, [], None
        for segment in segments:
            os.close(segment.fd)


# --- reading a dead listener's log ---------------------------------------------------------

def pending_records(folder):
    """The records of the log in ``folder`` not marked done, in the order they were
    appended (``Found``, data not read)."""
    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(PREFIX):
            found.extend(_segment_records(path))
        elif os.path.isdir(path):
            found.extend(_file_records(path))
    return sorted(found, key=lambda record: record.sequence)


def _file_records(folder):
    """The files of their own in ``folder`` (a previous version's layout too: a file
    per instance, numbered in arrival order)."""
    try:
        with open(os.path.join(folder, DOMAIN_FILE), "rb") as fh:
            domain = fh.read().decode()
    except (OSError, UnicodeDecodeError):
        return []
    found = []
    for name in os.listdir(folder):
        stem, dot, extension = name.partition(".")
        if dot and extension == "dcm" and stem.isdigit():
            path = os.path.join(folder, name)
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            found.append(Found(int(stem), domain, path, 0, size))
    return found


def _segment_records(path):
    try:
        fh = open(path, "rb")
    except OSError:
        return []
    found = []
    with fh:
        head = fh.read(HEADER_BYTES)
        if len(head) < _SEGMENT.size:
            return []
        magic, generation, crc = _SEGMENT.unpack_from(head)
        if magic != _SEGMENT_MAGIC or crc != zlib.crc32(struct.pack("<Q", generation)):
            return []
        offset = HEADER_BYTES
        while True:
            fh.seek(offset)
            raw = fh.read(_RECORD.size)
            if len(raw) < _RECORD.size:
                break
            magic, record_generation, sequence, name_size, size, crc = _RECORD.unpack(raw)
            if magic not in (LIVE, DONE) or record_generation != generation:
                break  # the end of this generation's records
            name = fh.read(name_size)
            if magic == LIVE:
                data = fh.read(size)
                if len(name) != name_size or len(data) != size or crc != zlib.crc32(
                        data, zlib.crc32(name, zlib.crc32(struct.pack(
                            "<QQHI", generation, sequence, name_size, size)))):
                    break  # an append cut short: never acknowledged, nor anything after it
                try:
                    domain = name.decode()
                except UnicodeDecodeError:
                    break
                found.append(Found(sequence, domain, path, offset + _RECORD.size + name_size,
                                   size))
            offset += _RECORD.size + name_size + size
    return found
