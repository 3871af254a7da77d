"""Volume exports as tasks: cases as MHD (API.md 3.3) and series in the plug-in input
format (3.2, ``export-cs-volume``).

A request checks privileges and existence, then creates a task; the worker runs the
handler, which streams the archive (``archives``) slice by slice into a temporary file
beside ``storage.download_path(taskId)`` and renames it when complete: memory stays about
one slice per volume plus one label blob, and no partial archive is ever offered. Any
failure ends the task with a message saying what went wrong (quirk 31 fixed).

The MHD export writes the revision's partial volume (quirk 21: the reference ignores the
descriptor and exports the whole series, which misplaces labels painted on a partial
volume); an entry without a descriptor gets every image of the series.
"""
import logging
import math
import os
import threading

import numpy as np

import archives
import blobs
import cases
import storage
import tasks
from dicom import tag_dump, volumes

from auth import require_cases_readable, require_series_domain
from errors import ApiError
from models import ClinicalCase, Series, db, iso
from series import check_pvd_range, get_series, parse_images, validate_pvd

log = logging.getLogger(__name__)

CASE_EXPORT_ERROR = "An internal error occurred while processing the case data."
FILE_ERROR = "Internal file system error happened while creating the download file."


class ExportError(Exception):
    """Raised while packing when the data to export is missing or unusable."""


# --- requests ---------------------------------------------------------------------------------

def _case_target(item):
    if isinstance(item, str):
        return {"caseId": item, "revisionIndex": None}
    return {"caseId": item["caseId"], "revisionIndex": item.get("revisionIndex")}


def start_mhd_export(user_email, privileges, body):
    """Check an export-mhd request (3.3) and queue its task; return the task ID.

    Raises
    ------
    ApiError
        400 ``Some cases do not exist.``; 401 ``You do not have enough read privilege for
        some cases.``
    """
    targets = [_case_target(item) for item in body["caseIds"]]
    ids = list(dict.fromkeys(t["caseId"] for t in targets))
    projects = dict(db.session.execute(db.select(ClinicalCase.case_id, ClinicalCase.project_id)
                                       .where(ClinicalCase.case_id.in_(ids))).all()) if ids else {}
    if len(projects) != len(ids):
        raise ApiError(400, "Some cases do not exist.")
    require_cases_readable(set(projects.values()), privileges)
    count = len(targets)
    fmt = body.get("compressionFormat", "tgz")
    task = tasks.create_task(
        user_email, "Export a case as MHD" if count == 1 else f"Export {count} cases as MHD",
        "export-mhd", params={"targets": targets,
                              "labelPackType": body.get("labelPackType", "isolated"),
                              "mhdLineEnding": body.get("mhdLineEnding", "lf"),
                              "compressionFormat": fmt},
        download_file_type=archives.FORMATS[fmt])
    db.session.commit()
    return task.task_id


def start_cs_volume_export(user_email, privileges, body):
    """Check an export-cs-volume request (3.2) and queue its task; return the task ID.

    Unlike the reference (quirk 6), every series must exist (404), be in one of the
    caller's domains (403, as the other series-domain checks) and hold every image of its
    descriptor (400).
    """
    entries = []
    for entry in body["series"]:
        series = get_series(entry["seriesUid"])
        require_series_domain(series, privileges)
        pvd = validate_pvd(entry["partialVolumeDescriptor"])
        check_pvd_range(series, pvd)
        entries.append({"seriesUid": series.series_uid, "partialVolumeDescriptor": pvd})
    fmt = body.get("compressionFormat", "tgz")
    task = tasks.create_task(user_email, "Export DICOM data", "export-cs-volume",
                             params={"series": entries, "compressionFormat": fmt},
                             download_file_type=archives.FORMATS[fmt])
    db.session.commit()
    return task.task_id


# --- writing an archive -----------------------------------------------------------------------

WRITEBACK_EVERY = 8 << 20  # bytes written between two background fdatasync calls


class _EarlyWriteback:
    """Starts the disk writes of a file while it is still being written.

    Every ``WRITEBACK_EVERY`` bytes, ``fdatasync`` runs on a thread (unless the previous
    one is still running), so the file's pages go to disk while the archive is compressed
    instead of all in the closing ``fsync``, which then has only the tail left. The thread
    is joined on exit, before the file is closed.
    """

    def __init__(self, fh):
        self.fh = fh
        self.fd = fh.fileno()
        self.since = 0
        self.thread = None

    def write(self, data):
        written = self.fh.write(data)
        self.since += len(data)
        if self.since >= WRITEBACK_EVERY and not (self.thread and self.thread.is_alive()):
            self.since = 0
            self.fh.flush()
            self.thread = threading.Thread(target=self._sync, name="writeback", daemon=True)
            self.thread.start()
        return written

    def _sync(self):
        try:
            os.fdatasync(self.fd)
        except OSError:  # the closing fsync reports a real failure
            pass

    def tell(self):
        return self.fh.tell()

    def seek(self, *args):
        return self.fh.seek(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.thread.join()


def write_archive(path, compression_format, fill):
    """Create ``path`` atomically as an archive filled by ``fill(archive)``.

    A failure (of ``fill`` or of the disk) leaves nothing at ``path``.
    """
    with storage.atomic_file(path) as fh, _EarlyWriteback(fh) as out:
        with archives.open_archive(out, compression_format) as archive:
            fill(archive)


def _run_export(task, fill, wrap_error):
    try:
        write_archive(storage.download_path(task.task_id),
                      task.params.get("compressionFormat", "tgz"), fill)
    except (volumes.VolumeError, ExportError) as exc:
        log.info("Export task %s failed: %s", task.task_id, exc)
        raise tasks.TaskError(wrap_error(str(exc))) from None
    except OSError:
        log.exception("Export task %s: file system error", task.task_id)
        raise tasks.TaskError(FILE_ERROR) from None


# --- export-cs-volume -------------------------------------------------------------------------

def add_plugin_volume(archive, series_uid, pvd, index):
    """Add ``<index>.mhd``, ``<index>.raw`` and ``<index>.json`` (API.md 5.3) to an archive."""
    dumps = []
    with volumes.VolumeReader(series_uid, volumes.pvd_images(pvd), keep_bytes=True) as reader:
        header = volumes.mhd_header(reader.pixel_format, reader.dimension,
                                    reader.spacing(reader.plugin_pitch()), f"{index}.raw")
        archive.add_bytes(f"{index}.mhd", header.encode("ascii"))

        def chunks():
            for slice_ in reader:
                dumps.append(volumes.dicom_tags(slice_, series_uid))
                yield slice_.pixels  # compressed in place, not copied
        archive.add(f"{index}.raw", reader.total_bytes, chunks())
    text = tag_dump.to_json(tag_dump.common_and_unique(dumps))
    archive.add_bytes(f"{index}.json", text.encode("utf-8"))


def run_cs_volume_export(task, progress):
    """The worker side of POST /api/series/export-cs-volume."""
    entries = task.params["series"]

    def fill(archive):
        progress("Processing volume #0", force=True)
        for i, entry in enumerate(entries):
            progress(f"Processing volume #{i + 1}", i, len(entries))
            add_plugin_volume(archive, entry["seriesUid"], entry["partialVolumeDescriptor"], i)
    _run_export(task, fill, lambda detail: detail)
    return "exported"


# --- export-mhd -------------------------------------------------------------------------------

class VoxelLabel:
    """A voxel label's bit-packed box (API.md 3.15), read plane by plane."""

    def __init__(self, index, data, where):
        self.index = index
        try:
            self.origin = [int(v) for v in data.get("origin") or (0, 0, 0)]
            self.size = [int(v) for v in data["size"]]
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"Label #{index} of {where} has no valid size.") from None
        if len(self.origin) != 3 or len(self.size) != 3 or min(self.size) < 0:
            raise ExportError(f"Label #{index} of {where} has no valid size.")
        path = blobs.path_of(data["voxels"])
        if path is None:
            raise ExportError(f"The voxel data {data['voxels']} of label #{index} of {where} "
                              "is missing.")
        with open(path, "rb") as fh:
            self.bits = np.frombuffer(fh.read(), dtype=np.uint8)
        w, h, d = self.size
        if self.bits.size < math.ceil(w * h * d / 8):
            raise ExportError(f"The voxel data of label #{index} of {where} is shorter than "
                              "its size.")

    def _window(self, z, rows, columns):
        """The part of plane ``z`` (rows, columns) this label covers, or None."""
        w, h, d = self.size
        ox, oy, oz = self.origin
        if not 0 <= z - oz < d or w == 0 or h == 0:
            return None
        x0, x1 = max(ox, 0), min(ox + w, columns)
        y0, y1 = max(oy, 0), min(oy + h, rows)
        return None if x0 >= x1 or y0 >= y1 else (x0, x1, y0, y1)

    def touches(self, z, rows, columns):
        """Whether ``paint`` would change anything in plane ``z``."""
        return self._window(z, rows, columns) is not None

    def paint(self, plane, z, value=None):
        """Write this label's plane at volume depth ``z`` into ``plane`` (rows, columns):
        its bits (0/1) when ``value`` is None, else ``value`` where a bit is set."""
        window = self._window(z, *plane.shape)
        if window is None:
            return
        x0, x1, y0, y1 = window
        w, h, _d = self.size
        ox, oy, oz = self.origin
        start = (z - oz) * w * h
        raw = self.bits[start // 8:(start + w * h + 7) // 8 + 1]
        bits = np.unpackbits(raw)[start % 8:start % 8 + w * h].reshape(h, w)
        box = bits[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        target = plane[y0:y1, x0:x1]
        if value is None:
            target[...] = box
        else:
            target[box.astype(bool)] = value


def _label_slices(labels, dimension, combined):
    columns, rows, depth = dimension
    # Planes no label reaches (most of them) all share one zero plane, never written to:
    # the archive writer compresses what it is given later, so it must not change.
    empty = np.zeros((rows, columns), dtype=np.uint8)
    empty.flags.writeable = False
    for z in range(depth):
        touching = [label for label in labels if label.touches(z, rows, columns)]
        if not touching:
            yield empty
            continue
        plane = np.zeros((rows, columns), dtype=np.uint8)
        for label in touching:
            label.paint(plane, z, label.index + 1 if combined else None)
        yield plane


def _revision(case, revision_index):
    revisions = cases.revisions(case)
    index = len(revisions) - 1 if revision_index is None else revision_index
    if not 0 <= index < len(revisions):
        raise ExportError(f"Invalid revision index: {revision_index}")
    return revisions[index]


def add_case(archive, case_id, revision_index=None, label_pack_type="isolated",
             line_ending="lf"):
    """Add one case (data.json, volumes, labels) to an archive, as API.md 3.3 lays it out."""
    case = db.session.get(ClinicalCase, case_id)
    if case is None:
        raise ExportError(f"Case {case_id} does not exist.")
    revision = _revision(case, revision_index)
    doc = {"caseId": case.case_id, "createdAt": iso(case.created_at),
           "updatedAt": iso(case.updated_at), "projectId": case.project_id,
           "revision": revision}
    archive.add_bytes(f"{case_id}/data.json", tag_dump.to_json(doc).encode("utf-8"))
    for vol_id, entry in enumerate(revision.get("series") or []):
        _add_case_volume(archive, case_id, vol_id, entry, label_pack_type, line_ending)


def _add_case_volume(archive, case_id, vol_id, entry, label_pack_type, line_ending):
    uid = entry["seriesUid"]
    series = db.session.get(Series, uid)
    if series is None:
        raise ExportError(f"Series {uid} of case {case_id} does not exist.")
    pvd = entry.get("partialVolumeDescriptor")
    if isinstance(pvd, dict):
        images, delta = volumes.pvd_images(pvd), pvd.get("delta") or 1
    else:
        images, delta = parse_images(series.images), 1
    base = f"{case_id}/vol{vol_id:03d}"
    with volumes.VolumeReader(uid, images) as reader:
        archive.add(f"{base}.raw", reader.total_bytes, (s.pixels for s in reader))
        dimension, spacing = reader.dimension, reader.spacing(reader.export_pitch(delta))
        header = volumes.mhd_header(reader.pixel_format, dimension, spacing,
                                    f"vol{vol_id:03d}.raw", line_ending)
    archive.add_bytes(f"{base}.mhd", header.encode("ascii"))
    labels = entry.get("labels") or []
    where = f"volume #{vol_id} of case {case_id}"
    voxel = [(i, label) for i, label in enumerate(labels) if label.get("type") == "voxel"]
    painted = [VoxelLabel(i, label["data"], where) for i, label in voxel
               if (label.get("data") or {}).get("voxels")]
    size = dimension[0] * dimension[1] * dimension[2]
    if label_pack_type == "combined":
        if voxel:  # as the reference: written when any voxel label exists, even if empty
            _add_label_volume(archive, f"{base}-label", size, _label_slices(
                painted, dimension, True), dimension, spacing, line_ending)
        return
    for label in painted:
        _add_label_volume(archive, f"{base}-label{label.index:03d}", size, _label_slices(
            [label], dimension, False), dimension, spacing, line_ending)


def _add_label_volume(archive, base, size, chunks, dimension, spacing, line_ending):
    archive.add(f"{base}.raw", size, chunks)
    name = base.rsplit("/", 1)[-1] + ".raw"
    archive.add_bytes(f"{base}.mhd", volumes.mhd_header("uint8", dimension, spacing, name,
                                                        line_ending).encode("ascii"))


def export_cases(archive, targets, label_pack_type="isolated", line_ending="lf",
                 progress=None):
    """Add every target ``{"caseId", "revisionIndex"}`` to an archive (task and CLI)."""
    for i, target in enumerate(targets):
        if progress:
            progress(f"Packing data for {target['caseId']}", i, len(targets))
        add_case(archive, target["caseId"], target.get("revisionIndex"), label_pack_type,
                 line_ending)
    if progress:
        progress("Performing compression...")


def run_mhd_export(task, progress):
    """The worker side of POST /api/cases/export-mhd."""
    params = task.params
    targets = params["targets"]

    def fill(archive):
        export_cases(archive, targets, params.get("labelPackType", "isolated"),
                     params.get("mhdLineEnding", "lf"), progress)
    _run_export(task, fill, lambda detail: f"{CASE_EXPORT_ERROR} {detail}")
    return f"Exported {len(targets)} case(s)."


# --- the command line -------------------------------------------------------------------------

ARCHIVE_SUFFIXES = {".tar.gz": "tgz", ".tgz": "tgz", ".zip": "zip"}


def export_case_files(case_ids, out, label_pack_type="isolated", use_zip=False,
                      line_ending="lf", keep_going=False, echo=print):
    """``flask export-case``: one archive ``out`` (a name ending in .tar.gz, .tgz or .zip)
    holding every case, or else ``<caseId>.tar.gz``/``.zip`` per case in the folder ``out``
    (CIRCUS's layout). Returns the files written; ExportError on the first failure unless
    ``keep_going``."""
    suffix = next((s for s in ARCHIVE_SUFFIXES if out.lower().endswith(s)), None)
    targets = [{"caseId": case_id, "revisionIndex": None} for case_id in case_ids]

    def one(path, fmt, chosen):
        try:
            write_archive(path, fmt, lambda archive: export_cases(
                archive, chosen, label_pack_type, line_ending,
                lambda message, *_a, **_k: echo(message)))
        except (volumes.VolumeError, ExportError) as exc:
            raise ExportError(str(exc)) from None
        except OSError as exc:
            raise ExportError(f"Cannot write {path}: {exc.strerror or exc}") from None
        return path

    if suffix:
        fmt = "zip" if use_zip else ARCHIVE_SUFFIXES[suffix]
        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        return [one(os.path.abspath(out), fmt, targets)]
    os.makedirs(out, exist_ok=True)
    written = []
    for target in targets:
        name = target["caseId"] + (".zip" if use_zip else ".tar.gz")
        try:
            written.append(one(os.path.join(os.path.abspath(out), name),
                               "zip" if use_zip else "tgz", [target]))
            echo(f"Exported {target['caseId']}")
        except ExportError as exc:
            if not keep_going:
                raise
            echo(f"Error: {target['caseId']}: {exc}")
    return written
