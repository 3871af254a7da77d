"""archives: the streamed tar.gz and zip writers, on entries spanning many deflate blocks."""
import gzip
import io
import shutil
import subprocess
import tarfile
import zipfile
import zlib

import numpy as np
import pytest

import archives


def _entries():
    rng = np.random.default_rng(5)
    noisy = (rng.normal(0, 40, (7, 300, 301)) - 1000).astype("<i2")  # odd sizes, ~3.8 MB
    zeros = np.zeros((300, 512), dtype=np.uint8)
    return [
        ("a/data.json", [b'{"x": 1}']),
        ("a/vol000.raw", [plane for plane in noisy]),
        ("a/vol000-label000.raw", [zeros] * 9 + [np.ones((300, 512), dtype=np.uint8)]),
        ("a/vol000.mhd", [b"NDims = 3\n"]),
        ("empty.bin", []),
        ("a/many.bin", [bytes([i % 251]) * (i * 37 % 5000) for i in range(600)]),
    ]


def _expected():
    return {name: b"".join(archives.byte_view(c).tobytes() for c in chunks)
            for name, chunks in _entries()}


def _write(fmt):
    out = io.BytesIO()
    with archives.open_archive(out, fmt) as archive:
        for name, chunks in _entries():
            size = sum(len(archives.byte_view(c)) for c in chunks)
            if name.endswith(".json"):
                archive.add_bytes(name, chunks[0])
            else:
                archive.add(name, size, iter(chunks))
    return out.getvalue()


def test_tgz_round_trip_over_many_blocks():
    data = _write("tgz")
    expected = _expected()
    raw = gzip.decompress(data)  # checks the gzip trailer's CRC-32 and size
    assert len(raw) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == list(expected)
        for member in members:
            assert tar.extractfile(member).read() == expected[member.name]
            assert member.mode == 0o644


def test_zip_round_trip_over_many_blocks():
    data = _write("zip")
    expected = _expected()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None  # every entry's CRC-32
        infos = zf.infolist()
        assert [i.filename for i in infos] == list(expected)
        for info in infos:
            assert info.compress_type == zipfile.ZIP_DEFLATED
            assert info.CRC == zlib.crc32(expected[info.filename])
            assert zf.read(info) == expected[info.filename]


@pytest.mark.skipif(shutil.which("gzip") is None, reason="no gzip command")
def test_tgz_passes_gzip_test(tmp_path):
    path = tmp_path / "x.tgz"
    path.write_bytes(_write("tgz"))
    subprocess.run(["gzip", "-t", str(path)], check=True)


def test_deflated_stream_is_smaller_than_the_data():
    data = _write("tgz")
    assert len(data) < 0.8 * sum(len(v) for v in _expected().values())


def test_declared_size_is_enforced():
    out = io.BytesIO()
    with pytest.raises(archives.EntrySizeError):
        with archives.open_archive(out, "tgz") as archive:
            archive.add("x", 3, [b"abcd"])
    with pytest.raises(archives.EntrySizeError):
        with archives.open_archive(out, "zip") as archive:
            archive.add("x", 5, [b"abcd"])
