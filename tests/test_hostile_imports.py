"""Untrusted DICOM input on every import path: archive entries held to the per-file limit,
pixel data far beyond what the header implies, and mutated headers that no reader can open.

Every path (the upload task, /single, the CLI) must refuse these and store nothing of them.
"""
import io
import os
import random
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pydicom
import pytest

import worker
from models import Series, Task, db
from tests.conftest import ROOT
from tests.dicom_factory import dicom_bytes
from tests.scratch_db import scratch_database_url
from tests.test_e2e import flask_cli, process_env

LIMIT = 1024 * 1024  # the per-file limit these tests configure
UNDEFINED_PIXELS = 0xFFFFFFF0  # what the bomb's Pixel Data declares


@pytest.fixture
def small_limit(app):
    app.config["UPLOAD_FILE_SIZE_MAX_BYTES"] = LIMIT
    return LIMIT


def _bomb_head(series_uid="1.2.3.77", declared=UNDEFINED_PIXELS):
    """A valid 8x8, 16-bit instance whose Pixel Data (OW) declares ``declared`` bytes; the
    bytes of the instance up to and including that length field."""
    data = dicom_bytes(series_uid=series_uid, rows=8, columns=8)
    pixel = data.rindex(b"\xe0\x7f\x10\x00OW\x00\x00")
    return data[:pixel + 8] + struct.pack("<I", declared)


def _zeros(size, chunk=256 * 1024):
    while size > 0:
        yield b"\0" * min(chunk, size)
        size -= chunk


def _zip_with_entry(name, head, zeros):
    """A zip whose one entry is ``head`` + ``zeros`` zero bytes, deflated as it is written
    (the entry is never whole in memory or on disk)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(name, "w", force_zip64=True) as entry:
            entry.write(head)
            for chunk in _zeros(zeros):
                entry.write(chunk)
    return out.getvalue()


class _Stream(io.RawIOBase):
    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.pending = b""

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self.pending:
            self.pending = next(self.chunks, None)
            if self.pending is None:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _targz_with_entry(name, head, zeros):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(head) + zeros
        archive.addfile(info, io.BufferedReader(_Stream([head, *_zeros(zeros)])))
    return out.getvalue()


def _upload(client, headers, files, single=False):
    data = {"files": [(io.BytesIO(content), name) for name, content in files]}
    url = "/api/series/domain/default" + ("/single" if single else "")
    return client.post(url, data=data, headers=headers, content_type="multipart/form-data")


def _run_task(app, task_id):
    with app.app_context():
        worker.run_pending()
        task = db.session.get(Task, task_id)
        return task.status, task.finished_message, task.error_message


def _stored(app):
    """Files under dicom/ and the series rows."""
    root = os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom")
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    with app.app_context():
        return files, db.session.query(Series).count()


@pytest.mark.parametrize("maker, name", [(_zip_with_entry, "bomb.zip"),
                                         (_targz_with_entry, "bomb.tar.gz")])
def test_archive_entry_over_the_file_limit_is_refused(app, client, auth_headers, small_limit,
                                                      maker, name):
    # As the hostile run sent it: the pixels declare less than follow (stored whole before).
    archive = maker("bomb.dcm", _bomb_head(declared=2 * LIMIT), 3 * LIMIT)
    assert len(archive) < LIMIT // 4  # small upload, large entry
    res = _upload(client, auth_headers["alice"], [(name, archive)])
    assert res.status_code == 201
    status, finished, error = _run_task(app, res.json["taskId"])
    assert status == "error", finished
    assert "bomb.dcm" in error and f"larger than {LIMIT} bytes" in error
    assert _stored(app) == ([], 0)


def test_zip_entry_that_declares_a_small_size_is_still_cut_at_the_limit(
        app, client, auth_headers, small_limit):
    """The size in the zip's headers is a claim: the limit holds while inflating."""
    archive = bytearray(_zip_with_entry("liar.dcm", _bomb_head(), 3 * LIMIT))
    real = len(_bomb_head()) + 3 * LIMIT
    for marker in (struct.pack("<Q", real), struct.pack("<I", real)):
        archive = archive.replace(marker, struct.pack("<Q" if len(marker) == 8 else "<I", 1000))
    res = _upload(client, auth_headers["alice"], [("liar.zip", bytes(archive))])
    status, _finished, error = _run_task(app, res.json["taskId"])
    assert status == "error" and "liar" in error
    assert _stored(app) == ([], 0)


def test_entries_under_the_limit_beside_a_refused_one_store_nothing_of_the_archive(
        app, client, auth_headers, small_limit):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("good.dcm", dicom_bytes(series_uid="1.2.3.78"))
        with archive.open("bomb.dcm", "w", force_zip64=True) as entry:
            entry.write(_bomb_head())
            for chunk in _zeros(2 * LIMIT):
                entry.write(chunk)
    res = _upload(client, auth_headers["alice"], [("mixed.zip", out.getvalue())])
    status, _finished, error = _run_task(app, res.json["taskId"])
    assert status == "error" and "bomb.dcm" in error
    assert _stored(app) == ([], 0)


def _oversized_pixels(series_uid="1.2.3.79"):
    """An 8x8 16-bit instance (128 bytes of pixels implied) carrying 256 KiB of pixel data."""
    extra = 256 * 1024
    return _bomb_head(series_uid, declared=extra) + b"\0" * extra


def test_single_refuses_pixel_data_far_larger_than_the_header_implies(app, client, auth_headers):
    res = _upload(client, auth_headers["alice"], [("big.dcm", _oversized_pixels())], single=True)
    assert res.status_code == 400
    assert "Pixel Data" in res.json["error"] and "larger" in res.json["error"]
    assert _stored(app) == ([], 0)


def test_upload_task_refuses_pixel_data_far_larger_than_the_header_implies(app, client,
                                                                           auth_headers):
    res = _upload(client, auth_headers["alice"], [("big.dcm", _oversized_pixels())])
    status, _finished, error = _run_task(app, res.json["taskId"])
    assert status == "error" and "Pixel Data" in error
    assert _stored(app) == ([], 0)


def test_single_over_the_file_limit_is_refused(app, client, auth_headers, small_limit):
    res = _upload(client, auth_headers["alice"],
                  [("big.dcm", _bomb_head(declared=2 * LIMIT) + b"\0" * (2 * LIMIT))],
                  single=True)
    assert res.status_code == 413 or res.status_code == 400
    assert "error" in res.json
    assert _stored(app) == ([], 0)


def test_cli_import_holds_archive_entries_to_the_file_limit(app, small_limit, tmp_path):
    path = tmp_path / "bomb.zip"
    path.write_bytes(_zip_with_entry("bomb.dcm", _bomb_head(declared=2 * LIMIT), 2 * LIMIT))
    result = app.test_cli_runner().invoke(args=["import-series", "-d", "default", str(path)])
    assert result.exit_code != 0
    assert "bomb.dcm" in result.output and f"larger than {LIMIT} bytes" in result.output
    assert _stored(app) == ([], 0)


def test_cli_import_refuses_oversized_pixel_data(app, tmp_path):
    path = tmp_path / "big.dcm"
    path.write_bytes(_oversized_pixels())
    result = app.test_cli_runner().invoke(args=["import-series", "-d", "default", str(path)])
    assert result.exit_code != 0 and "Pixel Data" in result.output
    assert _stored(app) == ([], 0)


PEAK_PROBE = """import atexit, resource, sys
atexit.register(lambda: sys.stderr.write(
    "\\nPEAK_RSS_KB=%d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
from flask.cli import main
sys.argv = ["flask", "--app", "app", "import-series", "-d", "default", sys.argv[1]]
main()
"""


def _peak_rss_of_import(env, path):
    """Peak RSS (bytes) of a `flask import-series` process importing ``path``, and its output."""
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    peak = int(done.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0])
    return peak * 1024, done.stdout + done.stderr


def test_a_bomb_entry_costs_no_more_memory_than_a_normal_import(tmp_path, dicom_dir):
    """The entry is streamed to its limit and refused: a 1 GiB entry (64 MiB limit) peaks
    no higher than importing ten small files."""
    limit = 64 * 1024 * 1024
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(_zip_with_entry("bomb.dcm", _bomb_head(declared=16 * limit), 16 * limit))
    with scratch_database_url() as database_url:
        env = process_env(tmp_path / "data", database_url,
                          CIRCUS_UPLOAD_FILE_SIZE_MAX_BYTES=str(limit))
        flask_cli(env, "init-db")
        bomb_peak, output = _peak_rss_of_import(env, bomb)
        assert f"larger than {limit} bytes" in output and "bomb.dcm" in output
        normal_peak, output = _peak_rss_of_import(env, dicom_dir / "head-first")
        assert "10 files imported" in output
    assert bomb_peak < normal_peak + limit // 4  # never the entry in memory


# --- mutated headers ------------------------------------------------------------------------

SAMPLES = ["misc/CT-MONO2-16-brain.dcm", "misc/MR-MONO2-16-head.dcm", "misc/MR-RGB-Head-MRA.dcm",
           "misc/CT-phantom-lossless.dcm", "misc/MR-phantom-LE.dcm",
           "head-first/head-first001.dcm", "foot-first/foot-first001.dcm"]
IMAGE_TAGS = [(0x0028, 0x0002), (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100),
              (0x0028, 0x0101), (0x0028, 0x0103), (0x0020, 0x0013)]
ODD_VRS = [b"ZZ", b"UQ", b"IS", b"DS", b"SS", b"OB", b"UN", b"LO", b"SQ", b"FD", b"\x00\x01"]


def _explicit_positions(data, group, element):
    """Offsets of an explicit-VR little-endian element header of (group, element)."""
    tag = struct.pack("<HH", group, element)
    found, start = [], 132
    while (index := data.find(tag, start)) != -1:
        if data[index + 4:index + 6].isalpha():
            found.append(index)
        start = index + 1
    return found


def _mutants(data, rng, count):
    """Mutated copies of one instance: byte flips in the header, odd VRs and wrong lengths on
    the elements the importer and the volume loader read, Rows as a broken integer string."""
    pixel = data.rfind(b"\xe0\x7f\x10\x00")
    header_end = pixel if pixel > 132 else min(len(data), 4096)
    for _ in range(count):
        copy = bytearray(data)
        kind = rng.choice(("flip", "vr", "length", "rows-is"))
        positions = [p for g, e in IMAGE_TAGS for p in _explicit_positions(data, g, e)]
        if kind == "flip" or not positions:
            for _ in range(rng.randint(1, 4)):
                copy[rng.randrange(132, header_end)] = rng.randrange(256)
        elif kind == "vr":
            at = rng.choice(positions)
            copy[at + 4:at + 6] = rng.choice(ODD_VRS)
        elif kind == "length":
            at = rng.choice(positions)
            copy[at + 6:at + 8] = struct.pack("<H", rng.choice((0, 1, 3, 4, 6, 255, 0xFFFF)))
        else:
            for at in _explicit_positions(data, 0x0028, 0x0010):
                copy[at + 4:at + 6] = b"IS"
                copy[at + 8:at + 10] = b"@\x01"
        yield bytes(copy)


def _implied_pixel_bytes(ds):
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8 * frames


def _assert_readable(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        for elem in ds:  # every element's value decodes
            elem.value
        pixels = ds.pixel_array
    assert pixels.size * (ds.BitsAllocated // 8) >= _implied_pixel_bytes(ds) // 1
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        assert len(ds.PixelData) >= _implied_pixel_bytes(ds)


def test_every_mutated_instance_stored_is_readable(app, client, auth_headers, dicom_dir):
    rng = random.Random(20261203)
    root = os.path.join(app.config["CIRCUS_DATA_DIR"], "dicom")
    stored = refused = 0
    for sample in SAMPLES:
        data = (dicom_dir / sample).read_bytes()
        for mutant in _mutants(data, rng, 45):
            before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
                      for d, _, names in os.walk(root) for f in names}
            res = _upload(client, auth_headers["alice"], [("m.dcm", mutant)], single=True)
            assert res.status_code in (201, 400), (sample, res.status_code, res.json)
            if res.status_code == 400:
                refused += 1
                continue
            stored += 1
            changed = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                       if before.get(os.path.join(d, f)) !=
                       os.stat(os.path.join(d, f)).st_mtime_ns]
            assert len(changed) == 1, sample
            _assert_readable(changed[0])
    assert stored > 20 and refused > 20  # both outcomes were exercised


@pytest.mark.parametrize("vr, rows", [(b"ZZ", None), (b"UQ", None), (b"IS", b"@\x01")])
def test_rows_with_an_odd_vr_is_refused(app, client, auth_headers, dicom_dir, vr, rows):
    """The three mutants a hostile run found stored (Rows with ZZ or UQ, Rows as an IS of
    '@\\x01'): each is a clear 400 now, and nothing is stored."""
    data = bytearray((dicom_dir / "misc/MR-phantom-LE.dcm").read_bytes())
    [at] = _explicit_positions(bytes(data), 0x0028, 0x0010)
    data[at + 4:at + 6] = vr
    if rows is not None:
        data[at + 8:at + 10] = rows
    res = _upload(client, auth_headers["alice"], [("m.dcm", bytes(data))], single=True)
    assert res.status_code == 400
    assert res.json["error"].startswith("Error while importing a DICOM file.")
    assert _stored(app) == ([], 0)
