"""Decoded series volumes kept in memory for the image server (/rs), bounded in bytes.

A ``CachedVolume`` holds one series' slices in one array, decoded on demand by a small
process-wide thread pool (so 50 viewers never run 50 decoders at once) with the same
decoder as exports and plug-in inputs (``volumes.read_slice``). A slice is usable as soon
as it is decoded: the first slice a viewer wants never waits for the rest. The cache maps
a series UID to its volume while the series is unchanged: its key holds the row's
``images`` and ``updated_at`` and the mtime of the series folder (a re-import renames
files into it), so a re-imported series is decoded afresh and a deleted one is not found.
Volumes are evicted least recently used first once their bytes pass the limit; a volume
larger than the limit is served but not kept.
"""
import logging
import mmap
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from flask import current_app

import storage
from dicom import volumes
from dicom.image_ranges import parse_images

log = logging.getLogger(__name__)

_pool = None
_pool_pid = None
_pool_lock = threading.Lock()


def decode_pool(threads):
    """The process's decoding pool (created lazily: a forked worker makes its own)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                       thread_name_prefix="rs-decode")
            _pool_pid = os.getpid()
        return _pool


def allocate_rows(count, size):
    """An uninitialised ``(count, size)`` uint8 array whose pages are mapped as they are
    written (memory grows with decoding), in small pages.

    numpy asks for transparent huge pages for large arrays; a volume written once and
    read slice by slice gains nothing from them, and in a VM that hands freed memory back
    to its host every fresh huge page is filled by the host at first touch: the first
    open of a 200-slice CT spent 2.5x longer writing slices into huge pages
    (bench/rs.py, first-open last slice 233 -> 162 ms median of 5)."""
    nbytes = count * size
    if nbytes == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty((count, size), dtype=np.uint8)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # a kernel without transparent huge pages
        pass
    # the array keeps the map alive; it is unmapped with the last view of it
    return np.frombuffer(memory, dtype=np.uint8).reshape(count, size)


def series_stamp(series):
    """What changes when ``series`` is re-imported: images, updated_at, the store's stamp
    (the folder's mtime on the data directory)."""
    return (series.images, str(series.updated_at), storage.series_stamp(series.series_uid))


class CachedVolume:
    """The slices of one series (ascending instance numbers), decoded on demand.

    ``data[z]`` holds slice ``z``'s little-endian bytes once ``done[z]``; geometry and
    pixel format come from the first slice decoded, and every other slice must match it.
    """

    def __init__(self, series_uid, numbers, stamp, pool, on_allocate=None):
        self.series_uid = series_uid
        self.numbers = list(numbers)
        self.index = {number: z for z, number in enumerate(self.numbers)}
        # resolved here, in the request: decoding threads have no app context
        self.store = storage.store()
        self.keys = [storage.instance_key(series_uid, n) for n in self.numbers]
        self.stamp = stamp
        self.pool = pool
        self.on_allocate = on_allocate
        self.decodes = 0  # slices decoded (tests and the benchmark read it)
        self.nbytes = 0
        self.accounted = False  # its bytes are in the cache's total
        self.data = None
        self.first = None
        self.slices = [None] * len(self.numbers)  # Slice without pixels: spacing, location
        self._done = [False] * len(self.numbers)
        self._errors = {}
        self._pending = set()
        self._attributes = {}
        self._cond = threading.Condition()

    # decoding
    def request(self, zs):
        """Queue the decoding of the slices ``zs`` not yet decoded nor queued."""
        with self._cond:
            wanted = [z for z in zs if not self._done[z] and z not in self._pending
                      and z not in self._errors]
            self.store.prefetch([self.keys[z] for z in wanted])
            for z in wanted:
                self._pending.add(z)
                self.pool.submit(self._decode, z)

    def get(self, z, timeout=None):
        """Slice ``z``'s bytes (a numpy row), decoding it first if needed; VolumeError."""
        with self._cond:
            while True:
                if self._done[z]:
                    return self.data[z]
                if z in self._errors:
                    raise self._errors[z]
                if z not in self._pending:
                    self._pending.add(z)
                    self.pool.submit(self._decode, z)
                if not self._cond.wait(timeout) and timeout is not None:
                    raise volumes.VolumeError(f"Image #{self.numbers[z]} of series "
                                              f"{self.series_uid} took too long to decode.")

    def slice_info(self, z, timeout=None):
        """The decoded ``Slice`` of ``z`` without its pixels (spacing, location...)."""
        self.get(z, timeout)
        return self.slices[z]

    def pixels(self, z, timeout=None):
        """Slice ``z`` as an array of the volume's pixel format."""
        row = self.get(z, timeout)
        return row.view(volumes.PIXEL_FORMATS[self.first.pixel_format][1])

    def attributes(self, z):
        """``volumes.image_attributes`` of slice ``z`` (read once)."""
        if z not in self._attributes:
            self._attributes[z] = volumes.stored_image_attributes(
                self.store, self.keys[z], self.numbers[z], self.series_uid)
        return self._attributes[z]

    def _decode(self, z):
        try:
            slice_ = volumes.read_stored_slice(self.store, self.keys[z], self.numbers[z],
                                               self.series_uid)
            pixels, slice_.pixels = slice_.pixels, None
            allocated = self._place(z, slice_, pixels)
        except volumes.VolumeError as exc:
            self._fail(z, exc)
            return
        except Exception as exc:  # a decoder bug must not hang the waiting viewers
            log.exception("Decoding image #%s of %s failed", self.numbers[z], self.series_uid)
            self._fail(z, volumes.VolumeError(f"Image #{self.numbers[z]} could not be "
                                              f"decoded ({type(exc).__name__})."))
            return
        if allocated and self.on_allocate is not None:
            self.on_allocate(self)

    def _place(self, z, slice_, pixels):
        allocated = False
        with self._cond:
            first = self.first
            if first is None:
                size = pixels.nbytes
                self.data = allocate_rows(len(self.numbers), size)
                self.nbytes = self.data.nbytes
                self.first = first = slice_
                allocated = True
            elif (slice_.columns, slice_.rows) != (first.columns, first.rows):
                raise volumes.VolumeError(f"Image #{slice_.number} of series "
                                          f"{self.series_uid} differs in size from the "
                                          "first image.")
            elif slice_.pixel_format != first.pixel_format:
                raise volumes.VolumeError(f"Image #{slice_.number} of series "
                                          f"{self.series_uid} differs in pixel format from "
                                          "the first image.")
        # the copy runs outside the lock: rows are disjoint
        self.data[z] = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
        with self._cond:
            self.slices[z] = slice_
            self._done[z] = True
            self._pending.discard(z)
            self.decodes += 1
            self._cond.notify_all()
        return allocated

    def _fail(self, z, error):
        with self._cond:
            self._errors[z] = error
            self._pending.discard(z)
            self._cond.notify_all()


class VolumeCache:
    """Series UID -> ``CachedVolume``, least recently used first out past ``limit`` bytes."""

    def __init__(self, limit, threads):
        self.limit = limit
        self.threads = threads
        self.entries = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def volume(self, series_uid, numbers, stamp):
        """The cached volume of this series state, or a new (empty) one."""
        with self._lock:
            current = self.entries.get(series_uid)
            if current is not None and current.stamp == stamp:
                self.entries.move_to_end(series_uid)
                return current
            if current is not None:
                self._drop(series_uid)
            created = CachedVolume(series_uid, numbers, stamp, decode_pool(self.threads),
                                   self._allocated)
            self.entries[series_uid] = created
            return created

    def _allocated(self, volume):
        with self._lock:
            if self.entries.get(volume.series_uid) is not volume:
                return  # replaced meanwhile: it lives only as long as its transfers
            if volume.nbytes > self.limit:
                del self.entries[volume.series_uid]
                return
            self.bytes += volume.nbytes
            volume.accounted = True
            while self.bytes > self.limit:
                oldest = next(iter(self.entries))
                self._drop(oldest)

    def _drop(self, series_uid):
        volume = self.entries.pop(series_uid)
        if volume.accounted:
            self.bytes -= volume.nbytes


def for_app():
    """The current app's cache (one per app: tests run several apps in one process)."""
    cache = current_app.extensions.get("circus.rs_volumes")
    if cache is None:
        cache = current_app.extensions.setdefault("circus.rs_volumes", VolumeCache(
            current_app.config["CIRCUS_RS_CACHE_BYTES"],
            current_app.config["CIRCUS_RS_DECODE_THREADS"]))
    return cache


def open_volume(series, numbers):
    """``(volume, zs)``: the cached volume of a series row and the slice indices of the
    image ``numbers`` asked for (None when one of them is not in the series)."""
    volume = for_app().volume(series.series_uid, parse_images(series.images),
                              series_stamp(series))
    zs = [volume.index.get(number) for number in numbers or volume.numbers]
    return volume, (None if None in zs else zs)
