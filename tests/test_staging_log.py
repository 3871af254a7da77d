"""The DICOM listener's staging log (dicom/staging_log.py): what a dead listener's log gives
back, segment reuse, large records, the shared flush."""
import os
import threading

import pytest

from dicom import staging_log
from dicom.staging_log import StagingLog, pending_records

SEGMENT = 64 * 1024  # small segments: rotation and reuse in a few records


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "listener"
    path.mkdir()
    return str(path)


def read_back(folder):
    return [(r.domain, r.read()) for r in pending_records(folder)]


def test_appended_and_synced_records_are_read_back_in_order(folder):
    log = StagingLog(folder, SEGMENT)
    records = [log.append(domain, bytes([n]) * (100 + n)) for n, domain in
               enumerate(["default", "other", "default"])]
    log.sync(records[-1])
    assert [log.read(r) for r in records] == [bytes([n]) * (100 + n) for n in range(3)]
    assert read_back(folder) == [("default", b"\0" * 100), ("other", b"\1" * 101),
                                 ("default", b"\2" * 102)]
    log.close()


def test_done_records_are_not_read_back(folder):
    log = StagingLog(folder, SEGMENT)
    first, second = log.append("default", b"a" * 10), log.append("default", b"b" * 10)
    log.sync(second)
    log.done([first])
    assert read_back(folder) == [("default", b"b" * 10)]
    log.close()


def test_a_torn_append_ends_its_segment(folder):
    log = StagingLog(folder, SEGMENT)
    first = log.append("default", b"a" * 1000)
    second = log.append("default", b"b" * 1000)
    log.sync(second)
    # An append cut short by a crash: the last bytes of the second record never landed.
    os.pwrite(second.segment.fd, b"\0" * 10, second.offset + 100)
    third = log.append("default", b"c" * 10)
    log.sync(third)
    assert read_back(folder) == [("default", b"a" * 1000)]
    assert first.segment is third.segment
    log.close()


def test_segments_rotate_and_are_reused_under_a_new_generation(folder):
    log = StagingLog(folder, SEGMENT)
    data = b"x" * 20000
    first = [log.append("default", data) for _ in range(3)]  # fills the first segment
    log.sync(first[-1])
    fourth = log.append("default", data)
    log.sync(fourth)
    assert fourth.segment is not first[0].segment
    log.done(first)
    fillers = [log.append("default", data) for _ in range(2)]
    new = b"n" * 10000
    reused = log.append("default", new)  # the second is full: the first is free again
    log.sync(reused)
    assert reused.segment is first[0].segment and reused.segment.generation == 2
    # The first generation's records (done or not) are never read back.
    assert read_back(folder) == [("default", data)] * 3 + [("default", new)]
    assert len([n for n in os.listdir(folder) if n.startswith(staging_log.PREFIX)]) == 2
    log.done([fourth, *fillers, reused])
    assert read_back(folder) == []
    log.close()


def test_a_large_instance_has_a_file_of_its_own_until_done(folder):
    log = StagingLog(folder, SEGMENT)
    small = log.append("default", b"s" * 100)
    large = os.urandom(3 * SEGMENT)
    record = log.append("other", large)
    log.sync(small)
    log.sync(record)  # durable already
    assert record.path is not None and record.segment is None
    with open(record.path, "rb") as fh:
        assert fh.read() == large  # the instance as received: the index links it
    assert log.read(record) == large
    assert read_back(folder) == [("default", b"s" * 100), ("other", large)]
    log.done([record])
    assert not os.path.exists(record.path)
    assert read_back(folder) == [("default", b"s" * 100)]
    log.close()


def test_prepare_keeps_a_spare_segment_once_the_log_is_used(folder):
    log = StagingLog(folder, SEGMENT)
    log.prepare()
    assert log.segments == []  # not before
    log.sync(log.append("default", b"x" * 100))
    log.prepare()
    log.prepare()
    assert len(log.segments) == 2
    log.close()


def test_concurrent_appends_share_flushes_and_all_are_durable(folder, monkeypatch):
    log = StagingLog(folder, SEGMENT * 16)
    flushes = []
    real = os.fdatasync

    def counted(fd):
        flushes.append(fd)
        real(fd)

    monkeypatch.setattr(staging_log.os, "fdatasync", counted)
    errors = []

    def store(n):
        try:
            for i in range(25):
                log.sync(log.append("default", f"{n}-{i}".encode()))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert log.flushed == log.written == 100
    assert len(flushes) <= 100
    assert sorted(data for _d, data in read_back(folder)) == sorted(
        f"{n}-{i}".encode() for n in range(4) for i in range(25))
    log.close()


def test_a_failed_flush_refuses_every_later_store(folder, monkeypatch):
    log = StagingLog(folder, SEGMENT)
    record = log.append("default", b"x")

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(staging_log.os, "fdatasync", failing)
    with pytest.raises(staging_log.StagingLogBroken):
        log.sync(record)
    monkeypatch.undo()
    with pytest.raises(staging_log.StagingLogBroken):
        log.append("default", b"y")
    log.close()
