"""The one import entry: ``/single``, uploads (the ``series_import`` task) and the CLI.

``import_paths`` imports files on disk (plain DICOM, zip, tar.gz) into a domain: the
worker's handler of an upload (``run_import_task``) and the CLI's ``import-series`` both
call it. It drives an ``Importer``, which imports batch by batch (``batch.ImportBatch``)
with CIRCUS's counts and messages. ``import_single`` is the synchronous import of the one
file ``/single`` streams straight into a batch's staging folder.
"""
import logging
import os
import tarfile
import time
import zipfile
import zlib
from typing import NamedTuple

import sqlalchemy as sa

import storage
import tasks
from dicom.archives import Limits, Prefixed, is_targz, is_zip, targz_entries, zip_entries
from dicom.batch import SMALL_ENTRY_BYTES, ImportBatch, instance_row, unlink_quietly
from dicom.elements import DICM_OFFSET, is_dicm
from dicom.errors import DicomImportError, ImportFailed
from dicom.header_scan import read_keys
from dicom.image_ranges import parse_ranges
from dicom.instance import STUDY_COLUMNS, default_offset, read_record
from models import Instance, Series, Task, db, upsert_statement

log = logging.getLogger(__name__)

BATCH_MAX_FILES = 2000  # plain files per batch (archives are one batch each)
BATCH_MAX_BYTES = 1024 ** 3


class Importer:
    """Imports files (plain DICOM, zip, tar.gz) into one domain, batch by batch.

    Counts follow CIRCUS's task messages: ``files`` uploaded files completely processed,
    ``entities`` DICOM instances imported. A failure raises ImportFailed with
    ``Error while processing file #<f>, entity #<e>: <reason>``; batches committed
    before it stay imported, the failing batch leaves nothing behind. With ``move_files``
    the files are the importer's to consume (an upload's spool): plain files are renamed
    into staging and an archive is removed once all its entries are staged.
    """

    def __init__(self, domain, on_entity=None, move_files=False):
        self.domain = domain
        self.on_entity = on_entity
        self.move_files = move_files
        self.offset = default_offset()
        self.limits = Limits.from_config()
        self.files = 0
        self.entities = 0  # committed
        self.pending_entities = 0  # staged in the open plain batch
        self.skipped = 0
        self.series_uids = set()
        self.plain = None

    def _fail(self, reason, entity):
        raise ImportFailed(f"Error while processing file #{self.files + 1}, "
                           f"entity #{entity}: {reason}")

    def _commit(self, batch):
        result = batch.commit()
        self.series_uids |= result.series_uids
        return result

    def _flush_plain(self):
        if self.plain is None:
            return
        try:
            self._commit(self.plain)
            self.entities += self.pending_entities
        finally:
            self.pending_entities = 0
            self.plain.discard()
            self.plain = None

    def _notify(self):
        if self.on_entity is not None:
            self.on_entity(self.entities + self.pending_entities)

    def import_file(self, path):
        """Import one file: a DICOM instance, a zip or a tar.gz; anything else is skipped."""
        with open(path, "rb") as fh:
            head = fh.read(DICM_OFFSET + 4)
            data = None
            if is_dicm(head) and os.fstat(fh.fileno()).st_size <= SMALL_ENTRY_BYTES:
                data = head + fh.read()  # one open per small file: opens are what cost most
        if is_dicm(head):
            self._import_plain(path, data)
        elif is_zip(head) or is_targz(head):
            self._flush_plain_or_fail()
            self._import_archive(path, "zip" if is_zip(head) else "targz")
        else:
            self.skipped += 1
        self.files += 1

    def _flush_plain_or_fail(self):
        try:
            self._flush_plain()
        except DicomImportError as exc:
            self._fail(f"{exc} None of the {self.pending_entities} DICOM files since the "
                       "last commit was imported.", self.entities + 1)

    def _import_plain(self, path, data=None):
        if self.plain is None:
            self.plain = ImportBatch(self.domain, self.offset)
        try:
            if data is not None:
                self.plain.add_bytes(data, move_from=path if self.move_files else None)
            else:
                self.plain.add_file(path, move=self.move_files)
        except DicomImportError as exc:
            entity = self.entities + self.pending_entities + 1
            # Instances before the broken one stay imported, as in CIRCUS.
            self._flush_plain_or_fail()
            self._fail(str(exc), entity)
        self.pending_entities += 1
        self._notify()
        if len(self.plain) >= BATCH_MAX_FILES or self.plain.bytes >= BATCH_MAX_BYTES:
            self._flush_plain_or_fail()

    def _import_archive(self, path, kind):
        skipped = [0]
        staged = 0
        entries = zip_entries if kind == "zip" else targz_entries
        with ImportBatch(self.domain, self.offset) as batch:
            try:
                for entry in entries(path, self.limits, skipped):
                    try:
                        with entry.open() as stream:
                            head = stream.read(DICM_OFFSET + 4)
                            if not is_dicm(head):
                                skipped[0] += 1
                                continue
                            batch.add_stream(Prefixed(head, stream), entry.size)
                    except DicomImportError as exc:
                        raise DicomImportError(f"{exc} (entry {entry.name!r})") from None
                    staged += 1
                    if self.on_entity is not None:
                        self.on_entity(self.entities + staged)
                if self.move_files:
                    # A spooled upload is read (and closed) once every entry is staged;
                    # removed now, its dirty pages are dropped instead of being flushed
                    # to disk by the commit's sync (which would double the data written).
                    unlink_quietly(path)
                self._commit(batch)
            except DicomImportError as exc:
                self._fail(f"{exc} Nothing of this archive was imported.",
                           self.entities + staged + 1)
            except storage.StorageError:
                raise  # not the archive's fault: the task says the store failed
            except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError,
                    OSError, RuntimeError, NotImplementedError, zlib.error) as exc:
                self._fail(f"The archive cannot be read ({exc}). Nothing of this archive "
                           "was imported.", self.entities + staged + 1)
        self.entities += staged
        self.skipped += skipped[0]

    def finish(self):
        """Commit what is still staged; return (entities, files, skipped, series count)."""
        self._flush_plain_or_fail()
        return self.entities, self.files, self.skipped, len(self.series_uids)

    def close(self):
        """Drop anything staged but not committed."""
        if self.plain is not None:
            self.plain.discard()
            self.plain = None


class ImportResult(NamedTuple):
    """What ``import_paths`` did, in CIRCUS's counts."""
    entities: int  # DICOM instances imported
    files: int  # files processed
    skipped: int  # files and archive entries that are not DICOM
    series: int  # series that received instances


def import_paths(domain, paths, on_entity=None, on_file=None, move_files=False):
    """Import files (plain DICOM, zip, tar.gz) into ``domain``; anything else is skipped.

    Parameters
    ----------
    domain : str
        The domain of the imported series.
    paths : iterable of str
        The files, in import order (``collect_paths`` expands folders).
    on_entity : callable, optional
        Called with the number of instances imported so far, staged ones included.
    on_file : callable, optional
        Called with each path once it is processed.
    move_files : bool
        The files are the importer's to consume (an upload's spool; see ``Importer``).

    Returns
    -------
    ImportResult

    Raises
    ------
    DicomImportError
        ImportFailed ``Error while processing file #<f>, entity #<e>: <reason>``; its
        ``imported`` is the number of instances committed before the failure, which stay.
    """
    importer = Importer(domain, on_entity=on_entity, move_files=move_files)
    try:
        for path in paths:
            importer.import_file(path)
            if on_file is not None:
                on_file(path)
        return ImportResult(*importer.finish())
    except DicomImportError as exc:
        exc.imported = importer.entities
        raise
    finally:
        importer.close()


def import_single(domain, receive):
    """Import exactly one DICOM file synchronously (``/single``); return its InstanceRecord.

    ``receive(folder, prefix)`` writes the upload into the batch's staging ``folder``
    under a name starting with ``prefix`` and returns its path: the file is then renamed
    into place, never copied, and its fsync starts at once, overlapping the checks and
    the database work.

    Raises
    ------
    DicomImportError
        NotDicomError, BrokenDicomError, InvalidInstanceError, DomainConflictError.
    """
    with ImportBatch(domain) as batch:
        record = batch.add_staged(receive(batch.dir, batch.prefix + "-upload-"), sync_now=True)
        batch.commit()
    return record


def collect_paths(paths, recursive):
    """Expand folders (recursively with ``recursive``) into a sorted list of file paths."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            if recursive:
                for folder, dirs, names in os.walk(path):
                    dirs.sort()
                    files.extend(os.path.join(folder, n) for n in sorted(names))
            else:
                files.extend(os.path.join(path, n) for n in sorted(os.listdir(path))
                             if os.path.isfile(os.path.join(path, n)))
        else:
            files.append(path)
    return [f for f in files if os.path.isfile(f) and not os.path.islink(f)]


# --- the task ---------------------------------------------------------------------------

TASK_NAME = "Series import"


def run_import_task(task, progress):
    """Worker: import the files spooled for an upload task (POST /series/domain/:domain)."""
    params = task.params or {}
    domain = params["domain"]
    try:
        spool = storage.take_spool(task.task_id)
        paths = [os.path.join(spool, name) for name in params.get("files", [])]
        result = import_paths(domain, paths, move_files=True,
                              on_entity=lambda n: progress(f"Imported {n} entities..."))
    except DicomImportError as exc:
        raise tasks.TaskError(str(exc)) from None
    except storage.StorageError as exc:
        # Nothing of the failed batch is indexed; its placed objects were removed (or are
        # swept): uploading again works once the store is back.
        raise tasks.TaskError(f"The files could not be stored: {exc}") from None
    finally:
        try:
            storage.remove_spool(task.task_id)
        except OSError:  # the store is failing: the task is over either way
            log.warning("The spool of task %s could not be removed", task.task_id)
    message = f"Imported {result.entities} entities from {result.files} files."
    if result.skipped:
        message += f" {result.skipped} non-DICOM entries were skipped."
    return message


def sweep_spools(grace_seconds, now=None):
    """Delete the stored files of uploads (``spool/<taskId>/``) older than ``grace_seconds``
    whose import task is over, or that never got a task row (its request failed): the import
    removes them as it ends, unless the store was failing then. A queued or running task's
    files stay. Returns the number of uploads whose files were deleted."""
    limit = (time.time() if now is None else now) - grace_seconds
    newest = {}
    for key, _size, mtime in storage.store().list("spool/"):
        parts = key.split("/")
        if len(parts) > 2 and storage.ID_RE.match(parts[1]):  # spool/<taskId>/<file>
            newest[parts[1]] = max(mtime, newest.get(parts[1], mtime))
    old = [task_id for task_id, mtime in newest.items() if mtime < limit]
    waiting = set()
    for i in range(0, len(old), 500):
        waiting.update(db.session.execute(sa.select(Task.task_id).where(
            Task.task_id.in_(old[i:i + 500]), Task.status == "processing")).scalars())
    db.session.rollback()
    ended = [task_id for task_id in old if task_id not in waiting]
    for task_id in ended:
        storage.remove_spool(task_id)
    if ended:
        log.info("Swept the stored files of %d ended upload(s).", len(ended))
    return len(ended)


# --- maintenance ------------------------------------------------------------------------

def refresh_parameters(max_date=None, on_series=None):
    """Re-read ``parameters`` of stored series from their first image, keeping updatedAt.

    Returns (refreshed, failed) counts.
    """
    query = db.select(Series.series_uid, Series.images).order_by(Series.created_at)
    if max_date is not None:
        query = query.where(Series.created_at <= max_date)
    rows = db.session.execute(query).all()
    db.session.rollback()
    refreshed = failed = 0
    for uid, images in rows:
        ranges = parse_ranges(images)
        try:
            record = read_record(storage.instance_path(uid, ranges[0][0]))
        except (DicomImportError, OSError, IndexError) as exc:
            log.warning("Cannot refresh parameters of %s: %s", uid, exc)
            failed += 1
        else:
            db.session.execute(sa.update(Series).where(Series.series_uid == uid).values(
                parameters=record.series["parameters"], updated_at=Series.updated_at))
            db.session.commit()
            refreshed += 1
        if on_series is not None:
            on_series(uid)
    return refreshed, failed


def index_instances(on_series=None):
    """Write the instances rows and the study-level columns of series stored before they
    were kept (series with no instances row), from their files; updatedAt is kept.

    Returns (indexed, failed) counts of series.
    """
    indexed_uids = sa.select(Instance.series_uid).distinct()
    rows = db.session.execute(db.select(Series.series_uid, Series.images)
                              .where(Series.series_uid.not_in(indexed_uids))
                              .order_by(Series.created_at)).all()
    db.session.rollback()
    indexed = failed = 0
    for uid, images in rows:
        try:
            instances = []
            for first, last in parse_ranges(images):
                for number in range(first, last + 1):
                    path = storage.instance_path(uid, number)
                    with open(path, "rb") as fh:
                        keys = read_keys(fh, os.fstat(fh.fileno()).st_size)
                    instances.append(instance_row(keys))
            record = read_record(storage.instance_path(uid, parse_ranges(images)[0][0]))
        except (DicomImportError, OSError, IndexError) as exc:
            log.warning("Cannot index the instances of %s: %s", uid, exc)
            failed += 1
        else:
            study = {name: record.series[name] for name in STUDY_COLUMNS}
            db.session.execute(sa.update(Series).where(Series.series_uid == uid).values(
                **study, updated_at=Series.updated_at))
            db.session.connection().execute(upsert_statement(Instance.__table__), instances)
            db.session.commit()
            indexed += 1
        if on_series is not None:
            on_series(uid)
    return indexed, failed
