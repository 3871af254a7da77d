"""Streaming tar.gz and zip writers for the export downloads.

Entries are written as streams of known size (``add(name, size, chunks)``), so a volume
never has to sit in memory; chunks may be numpy arrays, which are compressed in place. Deflate runs on a small thread pool in independent 1 MiB
blocks, each ended by a sync flush (as pigz does): the blocks concatenate into one valid
deflate stream, and the compression of one block overlaps the decoding of the next slices.
ISA-L (``isal``) compresses several times faster than zlib here; zlib is the fallback.
"""
import logging
import os
import struct
import tarfile
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

try:
    from isal import isal_zlib as _deflate_module
    LEVEL = 1  # ISA-L levels are 0-3
    _crc32 = _deflate_module.crc32  # several times faster than zlib's
    _crc32_combine = _deflate_module.crc32_combine
except ImportError:  # pragma: no cover - isal is in requirements.txt
    _deflate_module = zlib
    LEVEL = 1
    _crc32 = zlib.crc32
    _crc32_combine = None

log = logging.getLogger(__name__)

BLOCK = 1 << 20
THREADS = max(1, min(2, os.cpu_count() or 1))
IN_FLIGHT = 2 * THREADS  # blocks submitted and not yet written
FORMATS = {"tgz": "application/x-tgz", "zip": "application/zip"}


def _deflate_block(pieces, final):
    """Deflate ``pieces`` (compressed where they lie, not joined) as one sync-flushed run
    of the stream; returns ``(deflated parts, CRC-32 of the pieces or None, size)``: the
    parts are written one after the other, never joined into one copy.

    The CRC is computed here, on the pool's thread, when the blocks' CRCs can be combined
    (ISA-L), which keeps the thread that feeds the archive free to read the next slices."""
    compressor = _deflate_module.compressobj(LEVEL, zlib.DEFLATED, -15)
    out = [compressor.compress(piece) for piece in pieces]
    out.append(compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH))
    crc = None
    if _crc32_combine is not None:
        crc = 0
        for piece in pieces:
            crc = _crc32(piece, crc)
    return out, crc, sum(len(piece) for piece in pieces)


def byte_view(chunk):
    """A chunk (bytes or any C-contiguous buffer such as a numpy array) as a flat byte
    memoryview, without copying it."""
    view = memoryview(chunk)
    return view if view.format in ("B", "b", "c") and view.ndim == 1 else view.cast("B")


class _Deflater:
    """A raw deflate stream written to ``out``; tracks CRC-32 and sizes.

    Written data is gathered into blocks of about ``BLOCK`` bytes; each block is deflated
    (and its CRC computed) on the pool, and the results are written in order, at most
    ``IN_FLIGHT`` blocks behind the caller."""

    def __init__(self, out, pool):
        self.out = out
        self.pool = pool
        self.pending = deque()
        self.pieces = []  # written but not yet submitted
        self.buffered = 0
        self.crc = 0
        self.size = 0
        self.compressed = 0

    def write(self, data):
        """Add ``data`` (a byte view or bytes) to the stream. It is compressed later on a
        thread, so the caller must not change it afterwards."""
        size = len(data)
        if not size:
            return
        if _crc32_combine is None:
            self.crc = _crc32(data, self.crc)
        self.size += size
        self.pieces.append(data)
        self.buffered += size
        if self.buffered >= BLOCK:  # blocks of 1 MiB or a little more
            self._submit(self.pieces, False)
            self.pieces, self.buffered = [], 0

    def _submit(self, pieces, final):
        self.pending.append(self.pool.submit(_deflate_block, pieces, final))
        while len(self.pending) > IN_FLIGHT:
            self._write_one()

    def _write_one(self):
        parts, crc, size = self.pending.popleft().result()
        if crc is not None:
            self.crc = _crc32_combine(self.crc, crc, size)
        for part in parts:
            if part:
                self.out.write(part)
                self.compressed += len(part)

    def finish(self):
        self._submit(self.pieces, True)
        self.pieces, self.buffered = [], 0
        while self.pending:
            self._write_one()


class Archive:
    """Common interface: ``add``/``add_bytes`` entries, then ``close``.

    The chunks given to ``add`` may be bytes or numpy arrays (any C-contiguous buffer);
    they are compressed without being copied, so they must not change once yielded.
    """

    def __init__(self, fileobj):
        self.fileobj = fileobj
        self.pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="deflate")
        self.mtime = int(time.time())

    def add_bytes(self, name, data):
        self.add(name, len(data), [data])

    def add(self, name, size, chunks):
        raise NotImplementedError

    def close(self):
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.pool.shutdown(wait=False, cancel_futures=True)


class EntrySizeError(ValueError):
    """Raised when an entry's chunks do not add up to its declared size."""


def _copy(chunks, size, write, name):
    written = 0
    for chunk in chunks:
        chunk = byte_view(chunk)
        written += len(chunk)
        if written > size:
            raise EntrySizeError(f"{name}: more data than the declared {size} bytes")
        write(chunk)
    if written != size:
        raise EntrySizeError(f"{name}: {written} bytes instead of the declared {size}")


class TarGzArchive(Archive):
    """A POSIX (pax) tar archive inside one gzip member."""

    def __init__(self, fileobj):
        super().__init__(fileobj)
        header = b"\x1f\x8b\x08\x00" + struct.pack("<I", self.mtime) + b"\x00\xff"
        fileobj.write(header)
        self.deflater = _Deflater(fileobj, self.pool)
        self.offset = 0

    def _write(self, data):
        self.deflater.write(data)
        self.offset += len(data)

    def add(self, name, size, chunks):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self.mtime, 0o644
        self._write(info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8"))
        _copy(chunks, size, self._write, name)
        if size % tarfile.BLOCKSIZE:
            self._write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def close(self):
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._write(b"\0" * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))
        self.deflater.finish()
        self.fileobj.write(struct.pack("<II", self.deflater.crc, self.deflater.size & 0xFFFFFFFF))
        super().close()


def _dos_time(timestamp):
    t = time.localtime(timestamp)
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((max(t.tm_year, 1980) - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday)


class ZipArchive(Archive):
    """A ZIP64 archive of deflated entries; sizes are patched in after each entry (the
    output file must be seekable, as the temporary download file is)."""

    def __init__(self, fileobj):
        super().__init__(fileobj)
        self.entries = []
        self.dos_time, self.dos_date = _dos_time(self.mtime)

    def add(self, name, size, chunks):
        encoded = name.encode("utf-8")
        offset = self.fileobj.tell()
        self.fileobj.write(self._local_header(encoded, 0, 0, 0))
        deflater = _Deflater(self.fileobj, self.pool)
        _copy(chunks, size, deflater.write, name)
        deflater.finish()
        end = self.fileobj.tell()
        self.fileobj.seek(offset)
        self.fileobj.write(self._local_header(encoded, deflater.crc, deflater.compressed,
                                              deflater.size))
        self.fileobj.seek(end)
        self.entries.append((encoded, offset, deflater.crc, deflater.compressed, deflater.size))

    def _local_header(self, name, crc, compressed, size):
        extra = struct.pack("<HHQQ", 0x0001, 16, size, compressed)
        return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0x0800, 8, self.dos_time,
                           self.dos_date, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name),
                           len(extra)) + name + extra

    def close(self):
        start = self.fileobj.tell()
        for name, offset, crc, compressed, size in self.entries:
            extra = struct.pack("<HHQQQ", 0x0001, 24, size, compressed, offset)
            self.fileobj.write(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 45 | (3 << 8), 45, 0x0800, 8, self.dos_time,
                self.dos_date, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0,
                0o100644 << 16, 0xFFFFFFFF) + name + extra)
        end = self.fileobj.tell()
        count = len(self.entries)
        self.fileobj.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count,
                                       count, end - start, start))
        self.fileobj.write(struct.pack("<IIQI", 0x07064B50, 0, end, 1))
        self.fileobj.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF),
                                       min(count, 0xFFFF), min(end - start, 0xFFFFFFFF),
                                       0xFFFFFFFF, 0))
        super().close()


def open_archive(fileobj, compression_format):
    """A writer for ``tgz`` or ``zip`` into an open binary file."""
    if compression_format == "zip":
        return ZipArchive(fileobj)
    return TarGzArchive(fileobj)
