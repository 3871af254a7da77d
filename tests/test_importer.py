"""dicom.importer and dicom.batch: batches, archives and their failure modes."""
import io
import os
import shutil
import tarfile
import zipfile

import pytest
import sqlalchemy as sa

import storage
from dicom import batch as dicom_batch, errors
from dicom.archives import Bounded, Entry, Limits
from dicom.batch import ImportBatch
from dicom.importer import Importer, collect_paths, import_paths, refresh_parameters
from models import Series, db
from tests.dicom_factory import dicom_bytes, write_dicom

HEAD_FIRST_UID = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.547"


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


def data_files(app):
    """Every file under the DICOM root (staging included): what an import left behind."""
    found = []
    for folder, _dirs, names in os.walk(os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom")):
        found.extend(os.path.join(folder, n) for n in names)
    return sorted(found)


def series_rows():
    return db.session.execute(sa.select(Series)).scalars().all()


# --- batches ------------------------------------------------------------------------------

def _import(paths, domain="default"):
    with ImportBatch(domain) as batch:
        for path in paths:
            batch.add_file(str(path))
        return batch.commit()


def test_batch_stores_files_and_one_series_row(ctx, dicom_dir):
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    result = _import(paths)
    assert result.instances == 10 and result.series_uids == {HEAD_FIRST_UID}
    [series] = series_rows()
    assert series.images == "1-10" and series.domain == "default" and series.storage_id == 0
    assert series.patient_name == "TEST^MR1" and series.patient_age == 41
    for n in range(1, 11):
        stored = storage.instance_path(HEAD_FIRST_UID, n)
        assert open(stored, "rb").read() == paths[n - 1].read_bytes()
    assert not [f for f in data_files(ctx) if "/.staging/" in f]


@pytest.fixture(params=["syncfs", "fsync"])
def each_sync_path(request, monkeypatch):
    """Run a test with syncfs and with the fsync-per-file-and-folder fallback; batches of
    two files and more also take the sync-before-lock path."""
    if request.param == "fsync":
        monkeypatch.setattr(dicom_batch, "_SYNCFS", None)
        monkeypatch.setattr(dicom_batch, "SYNC_BEFORE_LOCK_MIN", 2)
    return request.param


def test_reimport_is_idempotent_and_batches_merge(ctx, dicom_dir, each_sync_path):
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    _import(paths[:3])
    _import(paths[5:7])
    assert series_rows()[0].images == "1-3,6-7"
    before = data_files(ctx)
    _import(paths[5:7])
    assert series_rows()[0].images == "1-3,6-7" and data_files(ctx) == before
    _import(paths[3:5])
    assert series_rows()[0].images == "1-7"
    assert len(series_rows()) == 1


def test_a_small_batch_fsyncs_its_files_and_a_large_one_syncs_the_file_system(
        ctx, dicom_dir, monkeypatch):
    """One file (/single) is made durable by its own fsyncs, without waiting for every
    other writer's data as a syncfs would; a large batch takes one syncfs."""
    real = dicom_batch._SYNCFS
    synced, fsynced = [], []
    monkeypatch.setattr(dicom_batch, "_SYNCFS", lambda fd: synced.append(fd) or (real(fd) if real else 0))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd) or real_fsync(fd))
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    _import(paths[:1])
    assert synced == [] and len(fsynced) >= 2  # the file and its folder (and the root)
    monkeypatch.setattr(dicom_batch, "SYNC_BEFORE_LOCK_MIN", 3)
    _import(paths[1:])
    assert synced and series_rows()[0].images == f"1-{len(paths)}"


def test_other_domain_is_refused_and_leaves_nothing(ctx, dicom_dir):
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    _import(paths[:2])
    before = data_files(ctx)
    with pytest.raises(errors.DomainConflictError, match="already exists in another domain"):
        _import(paths[2:4], domain="other")
    db.session.rollback()
    [series] = series_rows()
    assert (series.images, series.domain) == ("1-2", "default")
    assert data_files(ctx) == before


def test_failed_commit_removes_new_files(ctx, dicom_dir, each_sync_path):
    """Quirk 33: a database failure after the files were moved leaves no orphan file."""
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    _import(paths[:2])
    before = data_files(ctx)

    def refuse(_session):
        raise RuntimeError("database went away")
    sa.event.listen(db.session, "before_commit", refuse)
    try:
        with pytest.raises(RuntimeError):
            _import(paths)  # 1-2 are re-imports, 3-10 are new
    finally:
        sa.event.remove(db.session, "before_commit", refuse)
    assert data_files(ctx) == before
    assert series_rows()[0].images == "1-2"


def test_batch_with_a_bad_file_stores_nothing(ctx, dicom_dir, tmp_path):
    bad = write_dicom(str(tmp_path / "bad.dcm"), series_uid="1.2.3.4.9", InstanceNumber=None)
    with ImportBatch("default") as batch:
        batch.add_file(str(dicom_dir / "head-first" / "head-first001.dcm"))
        with pytest.raises(errors.InvalidInstanceError):
            batch.add_file(bad)
    assert data_files(ctx) == [] and series_rows() == []


# --- archives and the importer -------------------------------------------------------------

def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return str(path)


def _targz(path, entries):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def _run(paths, domain="default"):
    return import_paths(domain, [str(path) for path in paths])


def _series_entries(uid="1.2.3.100", count=3):
    return [(f"study/series/{n}.dcm", dicom_bytes(series_uid=uid, instance=n, z=-n))
            for n in range(1, count + 1)]


@pytest.mark.parametrize("maker", [_zip, _targz])
def test_archive_in_folders_with_skipped_entries(ctx, tmp_path, maker):
    entries = _series_entries() + [("notes/readme.txt", b"hello"),
                                   ("../../etc/x.dcm", dicom_bytes(series_uid="1.2.3.666")),
                                   ("/abs/y.dcm", dicom_bytes(series_uid="1.2.3.667"))]
    archive = maker(tmp_path / "a.archive", entries)
    entities, files, skipped, nseries = _run([archive])
    assert (entities, files, skipped, nseries) == (3, 1, 3, 1)
    [series] = series_rows()
    assert series.series_uid == "1.2.3.100" and series.images == "1-3"
    assert not os.path.exists(storage.series_dir("1.2.3.666"))


def test_symlink_entries_are_skipped(ctx, tmp_path):
    path = str(tmp_path / "links.tar.gz")
    with tarfile.open(path, "w:gz") as archive:
        data = dicom_bytes(series_uid="1.2.3.101")
        info = tarfile.TarInfo("a.dcm")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.dcm")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    zpath = str(tmp_path / "links.zip")
    with zipfile.ZipFile(zpath, "w") as archive:
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    assert _run([path, zpath])[:3] == (1, 2, 2)


def test_zip_bomb_fails_and_imports_nothing(ctx, tmp_path):
    ctx.config["ARCHIVE_MAX_TOTAL_BYTES"] = 1024 * 1024
    entries = _series_entries(count=2) + [("bomb.bin", b"\0" * (4 * 1024 * 1024))]
    archive = _zip(tmp_path / "bomb.zip", entries)
    assert os.path.getsize(archive) < 64 * 1024  # small on disk, large inflated
    with pytest.raises(errors.ImportFailed) as info:
        _run([archive])
    assert str(info.value).startswith("Error while processing file #1, entity #1: ")
    assert "larger than 1048576 bytes uncompressed" in str(info.value)
    assert info.value.imported == 0
    assert data_files(ctx) == [] and series_rows() == []


def test_zip_with_lying_sizes_cannot_inflate_more(ctx, tmp_path):
    """A zip that declares small sizes but inflates to more is cut at the declared size and
    then fails its CRC: the archive fails and nothing is imported."""
    ctx.config["ARCHIVE_MAX_TOTAL_BYTES"] = 1024 * 1024
    path = tmp_path / "liar.zip"
    _zip(path, _series_entries(count=1) + [("big.dcm", b"\0" * 128 + b"DICM" + b"\0" * 3000000)])
    raw = bytearray(path.read_bytes())
    size = (3000132).to_bytes(4, "little")
    for index in [i for i in range(len(raw)) if raw[i:i + 4] == size]:
        raw[index:index + 4] = (1000).to_bytes(4, "little")  # declared uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.ImportFailed, match="Nothing of this archive was imported"):
        _run([path])
    assert data_files(ctx) == [] and series_rows() == []


def test_entry_count_limit(ctx, tmp_path):
    ctx.config["ARCHIVE_MAX_ENTRIES"] = 3
    archive = _targz(tmp_path / "many.tar.gz", _series_entries(count=4))
    with pytest.raises(errors.ImportFailed, match="more than 3 entries"):
        _run([archive])
    assert data_files(ctx) == [] and series_rows() == []


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"garbage" * 50, b"\x1f\x8b" + b"junk" * 50])
def test_unreadable_archive_fails(ctx, tmp_path, content):
    path = tmp_path / "broken.archive"
    path.write_bytes(content)
    with pytest.raises(errors.ImportFailed, match="cannot be read"):
        _run([path])
    assert data_files(ctx) == [] and series_rows() == []


def test_file_that_is_not_a_zip_is_skipped(ctx, tmp_path):
    path = tmp_path / "fake.zip"
    path.write_bytes(b"this is not a zip at all" * 10)
    assert _run([path]) == (0, 1, 1, 0)


def test_archive_with_a_bad_entry_imports_nothing_of_it(ctx, tmp_path):
    entries = _series_entries(count=2) + [("3.dcm", dicom_bytes(series_uid="1.2.3.100",
                                                                InstanceNumber=None))]
    archive = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(errors.ImportFailed) as info:
        _run([archive])
    assert str(info.value).startswith("Error while processing file #1, entity #3: "
                                      "Instance number not set (entry '3.dcm')")
    assert data_files(ctx) == [] and series_rows() == []


def test_plain_files_before_a_broken_one_stay_imported(ctx, tmp_path):
    good = [write_dicom(str(tmp_path / f"{n}.dcm"), series_uid="1.2.3.102", instance=n)
            for n in (1, 2)]
    broken = tmp_path / "3.dcm"
    broken.write_bytes(dicom_bytes(series_uid="1.2.3.102", instance=3)[:300])
    with pytest.raises(errors.ImportFailed) as info:
        _run(good + [broken])
    assert str(info.value).startswith("Error while processing file #3, entity #3: ")
    assert info.value.imported == 2  # committed before the failure
    assert series_rows()[0].images == "1-2"
    assert len(data_files(ctx)) == 2


def test_large_entries_are_streamed_through_a_file(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(dicom_batch, "SMALL_ENTRY_BYTES", 100)
    archive = _zip(tmp_path / "a.zip", _series_entries(count=2))
    assert _run([archive])[0] == 2
    assert series_rows()[0].images == "1-2"


def test_collect_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.dcm", "a/b/2.dcm", "3.dcm"):
        (tmp_path / name).write_bytes(b"x")
    assert [os.path.relpath(p, tmp_path) for p in collect_paths([str(tmp_path)], True)] == \
        ["3.dcm", "a/1.dcm", "a/b/2.dcm"]
    assert [os.path.relpath(p, tmp_path) for p in collect_paths([str(tmp_path)], False)] == \
        ["3.dcm"]


def test_refresh_parameters_keeps_updated_at(ctx, dicom_dir):
    _import(sorted((dicom_dir / "head-first").glob("*.dcm"))[:2])
    series = series_rows()[0]
    updated = series.updated_at
    db.session.execute(sa.update(Series).values(parameters={}, updated_at=updated))
    db.session.commit()
    assert refresh_parameters() == (1, 0)
    db.session.expire_all()
    series = series_rows()[0]
    assert series.parameters["SliceThickness"] == 6 and series.updated_at == updated
    shutil.rmtree(storage.series_dir(HEAD_FIRST_UID))
    assert refresh_parameters() == (0, 1)


def test_a_consumed_archive_is_removed_before_the_commit(ctx, tmp_path):
    """An upload's spooled archive is gone before the commit's sync (its data need not
    reach the disk); an archive the importer does not own stays."""
    archive = _zip(tmp_path / "a.zip", _series_entries(uid="1.2.3.101"))
    kept = _zip(tmp_path / "b.zip", _series_entries(uid="1.2.3.102"))
    seen = []

    def look(_session):
        seen.append((os.path.exists(archive), os.path.exists(kept)))
    sa.event.listen(db.session, "before_commit", look)
    try:
        importer = Importer("default", move_files=True)
        importer.import_file(archive)
        assert importer.finish()[0] == 3
        assert _run([kept])[0] == 3
    finally:
        sa.event.remove(db.session, "before_commit", look)
    assert seen == [(False, True), (False, True)]


# --- the per-file limit on archive entries -------------------------------------------------

def test_bounded_stream_cuts_an_entry_at_the_limit():
    limits = Limits(max_bytes=10 ** 9, max_entries=10, max_entry_bytes=100)
    assert Bounded(io.BytesIO(b"x" * 100), limits).read() == b"x" * 100
    stream = Bounded(io.BytesIO(b"x" * 1000), limits)
    assert stream.read(60) == b"x" * 60
    with pytest.raises(errors.ArchiveLimitError, match="larger than 100 bytes"):
        stream.read(60)
    with pytest.raises(errors.ArchiveLimitError, match="larger than 100 bytes"):
        Bounded(io.BytesIO(b"x" * 1000), limits).read()


def test_entry_declaring_more_than_the_limit_is_refused_before_it_is_opened():
    limits = Limits(max_bytes=10 ** 9, max_entries=10, max_entry_bytes=100)
    opened = []
    entry = Entry("big.dcm", 101, lambda: opened.append(1) or io.BytesIO(b""), limits)
    with pytest.raises(errors.ArchiveLimitError, match="larger than 100 bytes"):
        entry.open()
    assert opened == []


@pytest.mark.parametrize("maker", [_zip, _targz])
def test_every_entry_is_held_to_the_per_file_limit(ctx, tmp_path, maker):
    """The Importer (uploads, the CLI) applies UPLOAD_FILE_SIZE_MAX_BYTES to each entry;
    entries under it import as before."""
    big = dicom_bytes(series_uid="1.2.3.101", rows=64, columns=64)  # ~8 KiB of pixels
    ctx.config["UPLOAD_FILE_SIZE_MAX_BYTES"] = len(big) - 1
    archive = maker(tmp_path / ("a" + maker.__name__), _series_entries(count=2) +
                    [("study/big.dcm", big)])
    with pytest.raises(errors.ImportFailed) as info:
        _run([archive])
    assert f"larger than {len(big) - 1} bytes" in str(info.value)
    assert "(entry 'study/big.dcm')" in str(info.value)
    assert "Nothing of this archive was imported." in str(info.value)
    assert data_files(ctx) == [] and series_rows() == []
    ctx.config["UPLOAD_FILE_SIZE_MAX_BYTES"] = len(big)
    assert _run([archive])[:2] == (3, 1)


def test_archive_entry_with_oversized_pixel_data_is_refused(ctx, tmp_path):
    data = dicom_bytes(series_uid="1.2.3.102", rows=8, columns=8)  # 128 bytes implied
    at = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    extra = 200 * 1024
    bomb = data[:at + 8] + extra.to_bytes(4, "little") + bytes(extra)
    archive = _targz(tmp_path / "pixels.tar.gz", _series_entries(count=1) + [("p.dcm", bomb)])
    with pytest.raises(errors.ImportFailed, match=r"Pixel Data \(7FE0,0010\) is larger"):
        _run([archive])
    assert data_files(ctx) == [] and series_rows() == []
