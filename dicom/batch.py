"""An import batch: temporary names, durability, one transaction, rename.

One DICOM instance becomes a file ``dicom/<seriesUid>/<8-digit instance>.dcm`` and a merge
into its series row (API.md 3.2.1). Instances are imported in *batches* (all plain files of
a chunk, or one whole archive) so that the durability work is paid once per batch:

1. each instance is checked (``header_scan.read_keys``: the fast walk over its header, or
   pydicom's parse for an unusual file; no pixel codecs needed) and written to a staging
   folder on the DICOM root's file system; only the first instance of a *new* series is
   parsed whole, at commit, for the series record;
2. a large batch makes its staged files durable with one ``syncfs`` before it takes
   any lock (a small batch only syncs, before their rename, the files that replace
   instances the database already knows);
3. one transaction locks the affected series rows, refuses series of another domain,
   renames the staged files into place, makes the renames (and a small batch's new
   files) durable with one ``syncfs`` (or fsync of each file and folder where ``syncfs``
   is unavailable), merges the ``images`` strings and commits; if anything fails, files
   that were new are removed again.

So a row never points at a missing or half-written file and a failed batch leaves
nothing behind (quirk 33 fixed).
"""
import ctypes
import functools
import io
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa

import storage
from dicom.errors import ArchiveLimitError, BrokenDicomError, DomainConflictError
from dicom.header_scan import read_keys
from dicom.image_ranges import images_string, merge_images, parse_ranges
from dicom.instance import InstanceRecord, default_offset, read_record
from models import Instance, Series, db, new_ulid, upsert_statement, utcnow

log = logging.getLogger(__name__)

SMALL_ENTRY_BYTES = 16 * 1024 * 1024  # instances up to this size are checked from memory
COPY_CHUNK = 1024 * 1024
SYNC_BEFORE_LOCK_MIN = 17  # batches from this many files sync their data before locking
IN_CHUNK = 500  # bound of SQL IN lists


# --- durability -------------------------------------------------------------------------

def _syncfs_function():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


_SYNCFS = _syncfs_function()


def _syncfs(folder):
    """One syncfs of the file system holding ``folder``; False where it is unavailable or
    fails (the caller then fsyncs each file, which reports the error)."""
    if _SYNCFS is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(folder, paths):
    """Flush the files of a batch to disk: one syncfs of the file system of ``folder``, or
    one fsync per file where syncfs is unavailable."""
    if not _syncfs(folder):
        for path in paths:
            _fsync(path)


_SYNC_POOL = []  # the fsync threads of early syncs, started on first use
# A forked child has none of its parent's threads: it starts a pool of its own.
os.register_at_fork(after_in_child=_SYNC_POOL.clear)


class EarlySync:
    """The fsync of one staged file, started on a thread as soon as the file is complete.

    ``os.fsync`` releases the GIL, so the flush to disk overlaps the header check and the
    database work of the same request (``/single``) instead of following them. The file
    is opened here, so the fsync reaches it even after it is renamed into place.
    """

    def __init__(self, path):
        if not _SYNC_POOL:
            _SYNC_POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="fsync"))
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.future = _SYNC_POOL[0].submit(os.fsync, self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def wait(self):
        """Block until the data is on disk (raising the fsync's error); closes the file."""
        if self.fd is None:
            return
        try:
            self.future.result()
        finally:
            os.close(self.fd)
            self.fd = None


def make_placed_durable(files, folders, root_changed):
    """After renames into ``folders``: make the renames and the not yet synced ``files``
    durable, with one syncfs (data and metadata of the whole file system), else with an
    fsync of each file, each folder and, when a folder was created, the DICOM root.
    A few files in a few folders (``/single``, small uploads) take those fsyncs only: a
    syncfs would also wait for everyone else's writes (an export, another upload)."""
    targeted = len(files) < SYNC_BEFORE_LOCK_MIN and len(folders) < SYNC_BEFORE_LOCK_MIN
    if folders and not targeted and _syncfs(next(iter(folders))):
        return
    for path in files:
        _fsync(path)
    for folder in folders:
        storage.fsync_dir(folder)
    if root_changed:
        storage.fsync_dir(storage.root("dicom"))


# --- a batch ----------------------------------------------------------------------------

@dataclass
class BatchResult:
    """What a committed batch did."""
    instances: int = 0
    series_uids: set = field(default_factory=set)
    new_instances: int = 0


class ImportBatch:
    """Instances staged for one all-or-nothing import into ``domain``.

    Use as a context manager: the staging folder is removed on exit, committed or not.
    """

    def __init__(self, domain, utc_offset=None):
        self.domain = domain
        self.utc_offset = default_offset() if utc_offset is None else utc_offset
        # One shared staging folder; this batch's files carry its own prefix.
        self.dir = storage.dicom_staging_dir("batches")
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
        self.prefix = new_ulid()
        self.staged = {}  # (seriesUid, instance) -> staged path; the last copy wins
        self.keys = {}  # (seriesUid, instance) -> its InstanceKeys (the instances row)
        # seriesUid -> key of its first instance, whose whole header is parsed at commit
        # if the series is new (so a batch stays small in memory and an instance of a
        # known series is never parsed by pydicom).
        self.first_key = {}
        self.series_values = {}  # seriesUid -> a series record its caller parsed (add_bytes)
        self.bytes = 0
        self._counter = 0
        self.syncing = {}  # staged path -> EarlySync (add_staged with sync_now)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.discard()

    def __len__(self):
        return len(self.staged)

    def _staged_name(self):
        self._counter += 1
        return os.path.join(self.dir, f"{self.prefix}-{self._counter:08d}")

    def _keep(self, keys, path, size):
        number, uid = keys.instance_number, keys.series_uid
        key = (uid, number)
        previous = self.staged.get(key)
        if previous is not None:
            self._forget_sync(previous)
            os.unlink(previous)
        self.staged[key] = path
        self.keys[key] = keys
        self.first_key.setdefault(uid, key)
        self.bytes += size
        offset = self.utc_offset
        return InstanceRecord(number, uid, load=lambda: read_record(path, offset).series)

    def add_bytes(self, data, move_from=None, keys=None, series=None):
        """Stage one instance given as bytes; return its InstanceRecord.

        ``move_from`` names a file holding the same bytes that may be taken over (a spool
        file): it is renamed into the staging folder instead of writing a copy. ``keys``:
        the ``read_keys`` of these bytes when the caller made that check (not made again);
        ``series``: their series record, when it parsed them whole (a DICOM listener).
        """
        if keys is None:
            keys = read_keys(io.BytesIO(data), len(data))
        if series is not None:
            self.series_values.setdefault(keys.series_uid, series)
        path = self._staged_name()
        try:
            if move_from is None:
                raise OSError("nothing to move")
            os.replace(move_from, path)
        except OSError:
            with open(path, "wb") as fh:
                fh.write(data)
        return self._keep(keys, path, len(data))

    def add_stream(self, stream, size):
        """Stage one instance read from a stream of known size (an archive entry)."""
        if size <= SMALL_ENTRY_BYTES:
            data = _read_exactly(stream, size)
            return self.add_bytes(data)
        path = self._staged_name()
        try:
            with open(path, "wb") as out:
                copied = _copy_bounded(stream, out, size)
            if copied != size:
                raise BrokenDicomError("The archive entry is shorter than declared.")
            return self.add_staged(path)
        except BaseException:
            unlink_quietly(path)
            raise

    def add_file(self, path, move=False):
        """Stage one instance from a file; ``move`` takes the file over (spool files)."""
        size = os.path.getsize(path)
        if not move and size <= SMALL_ENTRY_BYTES:
            with open(path, "rb") as fh:
                return self.add_bytes(fh.read())
        staged = self._staged_name()
        if move:
            try:
                os.replace(path, staged)
            except OSError:  # another file system: copy instead
                shutil.copyfile(path, staged)
        else:
            shutil.copyfile(path, staged)
        try:
            return self.add_staged(staged)
        except BaseException:
            unlink_quietly(staged)
            raise

    def add_link(self, path, keys=None, series=None):
        """Stage a hard link to ``path``, a file on the DICOM root's file system that must
        stay where it is until the commit succeeds (an instance a DICOM listener has
        acknowledged: dicom/net.py). ``keys`` and ``series`` as for ``add_bytes``."""
        staged = self._staged_name()
        os.link(path, staged)
        try:
            if keys is None:
                return self.add_staged(staged)
            if series is not None:
                self.series_values.setdefault(keys.series_uid, series)
            return self._keep(keys, staged, os.path.getsize(staged))
        except BaseException:
            unlink_quietly(staged)
            raise

    def add_staged(self, staged, sync_now=False, data=None, header=None):
        """Stage a file already in the staging folder (named by ``_staged_name`` or with
        this batch's prefix). ``sync_now`` starts its fsync at once (EarlySync): for a
        batch of one file, whose commit would otherwise wait for it. ``data``: the file's
        bytes when the caller holds them (checked without reading the file again);
        ``header``: their ``header_scan.scan`` if the caller made it (not made again)."""
        if sync_now:
            self.syncing[staged] = EarlySync(staged)
        try:
            if data is not None:
                size = len(data)
                keys = read_keys(io.BytesIO(data), size, header)
            else:
                with open(staged, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    keys = read_keys(fh, size, header)
        except BaseException:
            self._forget_sync(staged)
            raise
        return self._keep(keys, staged, size)

    def _forget_sync(self, staged):
        """Wait for the early sync of ``staged`` (if any) and drop it, ignoring its error
        (the file is being discarded)."""
        early = self.syncing.pop(staged, None)
        if early is not None:
            try:
                early.wait()
            except OSError:
                pass

    def discard(self):
        """Remove whatever this batch still has in the staging folder."""
        for staged in list(self.syncing):
            self._forget_sync(staged)
        for name in os.listdir(self.dir):
            if name.startswith(self.prefix):
                unlink_quietly(os.path.join(self.dir, name))
        self.staged = {}
        self.keys = {}
        self.first_key = {}
        self.series_values = {}

    def commit(self, conflicts=None):
        """Make the staged files durable, move them into place and upsert the series rows
        in one transaction; on failure nothing of the batch remains. Return a BatchResult.

        ``conflicts``: a set; a series that exists in another domain is then left out of
        the batch (its UID added to the set) instead of failing it, checked under the
        same locks as the rest (STOW-RS: one bad series does not spoil the others).

        Raises
        ------
        DomainConflictError
            When a series of the batch already exists in another domain (and
            ``conflicts`` is None).
        """
        if not self.staged:
            return BatchResult()
        # A large batch flushes its data before it locks anything (the flush takes long);
        # a small one leaves it to the single sync after its renames.
        # (A store that makes what it publishes durable itself needs neither.)
        store = storage.store()
        synced = len(self.staged) >= SYNC_BEFORE_LOCK_MIN or store.publish_is_durable
        if synced and not store.publish_is_durable:
            make_durable(self.dir, list(self.staged.values()))
        by_series = {}
        for (uid, number) in self.staged:
            by_series.setdefault(uid, []).append(number)
        placed = []
        try:
            new_files = self._upsert(store, by_series, placed, synced, conflicts)
        except BaseException:
            db.session.rollback()
            self._remove_new(store, placed)
            raise
        log.info("Imported %d instances into %d series (%s)", len(self.staged),
                 len(by_series), self.domain)
        self.staged = {}
        self.keys = {}
        self.first_key = {}
        self.series_values = {}
        return BatchResult(instances=sum(len(v) for v in by_series.values()),
                           series_uids=set(by_series), new_instances=len(new_files))

    def _leave_out(self, uid, numbers):
        """Drop the staged instances of series ``uid`` from this batch."""
        for number in numbers:
            staged = self.staged.pop((uid, number))
            del self.keys[(uid, number)]
            self._forget_sync(staged)
            unlink_quietly(staged)

    def _lock_rows(self, uids):
        """``{uid: (domain, images)}`` of the existing series of ``uids``, their rows locked
        until the transaction ends."""
        if db.engine.dialect.update_returning:
            # One statement: a no-op UPDATE takes the locks (SQLite's database lock, row
            # locks elsewhere) and RETURNING reads the two columns the merge needs.
            # Core statements run on the session's connection: the ORM adds nothing here.
            return {uid: (domain, images) for uid, domain, images in
                    db.session.connection().execute(_LOCK_SERIES, {"uids": list(uids)})}
        found = {}
        if db.engine.dialect.name == "sqlite":
            # A write first takes SQLite's database lock, so the rows read next cannot
            # change before this transaction commits.
            for chunk in _chunks(uids):
                db.session.execute(sa.update(Series).where(Series.series_uid.in_(chunk))
                                   .values(images=Series.images, updated_at=Series.updated_at)
                                   .execution_options(synchronize_session=False))
        for chunk in _chunks(uids):
            query = db.select(Series).where(Series.series_uid.in_(chunk))
            if db.engine.dialect.name != "sqlite":
                query = query.with_for_update()
            for series in db.session.execute(query).scalars():
                found[series.series_uid] = (series.domain, series.images)
        return found

    def _series_values(self, uid):
        """The series record of a new series, from the whole header of its first staged
        instance (or as its caller parsed it)."""
        if uid in self.series_values:
            return dict(self.series_values[uid])
        record = read_record(self.staged[self.first_key[uid]], self.utc_offset)
        if record.series_uid != uid:  # the walk and pydicom disagree: trust neither
            raise BrokenDicomError("The DICOM file cannot be parsed consistently.")
        return dict(record.series)

    def _upsert(self, store, by_series, placed, synced, conflicts=None):
        new_keys = set()
        now = utcnow()
        for chunk in _chunks(sorted(by_series)):
            existing = self._lock_rows(chunk)
            inserts = []
            updates = []
            for uid in chunk:
                numbers = by_series[uid]
                row = existing.get(uid)
                if row is None:
                    values = self._series_values(uid)
                    patient_info = values.pop("patient_info")
                    inserts.append({**values, **Series.patient_columns(patient_info),
                                    "images": images_string(numbers), "domain": self.domain,
                                    "storage_id": 0, "created_at": now, "updated_at": now})
                    new_keys.update((uid, n) for n in numbers)
                    continue
                domain, images = row
                if domain != self.domain and conflicts is not None:
                    conflicts.add(uid)
                    self._leave_out(uid, by_series.pop(uid))
                    continue
                if domain != self.domain:
                    raise DomainConflictError(
                        f"The series {uid} already exists in another domain; its instances "
                        f"cannot be imported into the domain \"{self.domain}\".")
                ranges = parse_ranges(images)
                new_keys.update((uid, n) for n in numbers
                                if not any(a <= n <= b for a, b in ranges))
                updates.append({"uid": uid, "images": merge_images(images, numbers),
                                "now": now})
            # Core statements on the session's connection: no ORM objects to flush or keep.
            if updates:
                db.session.connection().execute(_UPDATE_IMAGES, updates)
            if inserts:
                db.session.connection().execute(_INSERT_SERIES, inserts)
        pairs = []
        for (uid, number), staged in sorted(self.staged.items()):
            is_new = (uid, number) in new_keys
            syncing = self.syncing.get(staged)
            if syncing is not None:
                if not is_new:
                    syncing.wait()  # it replaces a file a row points at
            elif not synced and not is_new:
                # It replaces a file a row points at: its data must be durable first.
                _fsync(staged)
            pairs.append((staged, storage.instance_key(uid, number)))
            placed.append((pairs[-1][1], is_new))
        folders = set()
        created = False
        unsynced = []
        # Renamed into place (data directory), or uploaded (object store) in parallel.
        for (staged, _key), (_key, is_new), where in zip(pairs, placed,
                                                         store.publish_many(pairs)):
            if where.path is None:
                continue  # durable already
            folders.add(os.path.dirname(where.path))
            created = created or where.new_folder
            if is_new and not synced and staged not in self.syncing:
                unsynced.append(where.path)
        self._index_instances()
        # Before the commit: no row ever points at a file that is not durable.
        make_placed_durable(unsynced, folders, created)
        for syncing in self.syncing.values():
            syncing.wait()  # on failure, discard() waits for the others
        self.syncing = {}
        db.session.commit()
        return new_keys

    def _index_instances(self):
        """Write the instances rows of every staged instance (a replaced one is updated)."""
        rows = [instance_row(keys) for keys in self.keys.values()]
        if rows:
            connection = db.session.connection()
            connection.execute(_instance_upsert(connection.dialect.name), rows)

    @staticmethod
    def _remove_new(store, placed):
        """Undo the placing of instances the database does not know."""
        for key, is_new in placed:
            if is_new:
                try:
                    store.delete(key)
                except OSError:  # the store is failing: its sweep removes the orphan
                    log.warning("Could not remove %s after a failed import", key)


def instance_row(keys):
    """The instances row of an instance's InstanceKeys."""
    return {"series_uid": keys.series_uid, "instance_number": keys.instance_number,
            "sop_instance_uid": keys.sop_instance_uid, "sop_class_uid": keys.sop_class_uid,
            "transfer_syntax_uid": keys.transfer_syntax_uid,
            "number_of_frames": keys.number_of_frames, "rows": keys.rows,
            "columns": keys.columns}


_SERIES = Series.__table__
_INSERT_SERIES = _SERIES.insert()
_LOCK_SERIES = (_SERIES.update().where(_SERIES.c.series_uid.in_(sa.bindparam("uids", expanding=True)))
                .values(images=_SERIES.c.images, updated_at=_SERIES.c.updated_at)
                .returning(_SERIES.c.series_uid, _SERIES.c.domain, _SERIES.c.images))
_UPDATE_IMAGES = (_SERIES.update().where(_SERIES.c.series_uid == sa.bindparam("uid"))
                  .values(images=sa.bindparam("images"), updated_at=sa.bindparam("now")))


@functools.lru_cache(maxsize=4)
def _instance_upsert(dialect_name):
    """The instances upsert, built once per dialect (building it cost ~1 ms per commit:
    most of a one-instance STOW-RS or /single commit's Python time)."""
    return upsert_statement(Instance.__table__, dialect_name)


def _chunks(items, size=IN_CHUNK):
    items = list(items)
    for i in range(0, len(items), size):
        yield items[i:i + size]


def unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_exactly(stream, size):
    data = stream.read(size + 1)
    if len(data) > size:
        raise ArchiveLimitError("An archive entry is larger than declared.")
    if len(data) < size:
        raise BrokenDicomError("The archive entry is shorter than declared.")
    return data


def _copy_bounded(stream, out, size):
    copied = 0
    while True:
        chunk = stream.read(COPY_CHUNK)
        if not chunk:
            return copied
        copied += len(chunk)
        if copied > size:
            raise ArchiveLimitError("An archive entry is larger than declared.")
        out.write(chunk)


# --- orphans ------------------------------------------------------------------------------------

_INSTANCE_KEY = re.compile(r"^dicom/([0-9.]+)/([0-9]{8})\.dcm$")


def sweep_orphans(grace_seconds, now=None):
    """Delete stored instance files that no instances row points at and that are older than
    ``grace_seconds`` (an import killed between placing its files and its commit, a store
    that failed while a deletion removed files). Younger ones may belong to a batch still
    committing. Returns the number deleted."""
    store = storage.store()
    limit = (time.time() if now is None else now) - grace_seconds
    by_series = {}
    for key, _size, mtime in store.list("dicom/"):
        match = _INSTANCE_KEY.match(key)
        if match and mtime < limit:
            by_series.setdefault(match.group(1), []).append((int(match.group(2)), key))
    removed = 0
    for uid, found in by_series.items():
        known = set(db.session.execute(sa.select(Instance.instance_number)
                                       .where(Instance.series_uid == uid)).scalars())
        for number, key in found:
            if number not in known:
                store.delete(key)
                removed += 1
    db.session.rollback()
    if removed:
        log.info("Swept %d stored instance file(s) without a row.", removed)
    return removed
