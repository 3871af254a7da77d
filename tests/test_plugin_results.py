"""plugins.results: results.json waiting and validation, and the copy of out/, which is
hostile input: links never followed, unsafe names skipped, limits on files, bytes and depth
checked before anything is copied, nothing half-copied."""
import json
import os
import threading
import time

import pytest

from plugins import results
from plugins.job_log import LOG_NAME, JobLog, PluginRunError

LIMITS = {"max_files": 100, "max_bytes": 10000}


# --- results --------------------------------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    (b'{"results": ', "Plug-in validation failed: Expecting value"),
    (b'{"results": {"x": NaN}}', "Plug-in validation failed: NaN is not valid JSON"),
    (b'\xff\xfe{}', "Plug-in validation failed: 'utf-8' codec can't decode"),
    (b'[1, 2]', "Plug-in validation failed: results.json [1, 2] is not of type 'object'"),
    (b'{"results": {"lesionCandidates": [{"volumeId": 0, "location": [1, 2, 3]}]}}',
     "Plug-in validation failed: results/lesionCandidates/0 'confidence' is a required property"),
    (b'{"metadata": {"displayOptions": [{"volumeId": 0, "window": {"level": 1}}]}}',
     "Plug-in validation failed: metadata/displayOptions/0/window 'width' is a required"),
    (b'not json at all', "Plug-in validation failed: Expecting value"),
    (b'[' * 200000 + b']' * 200000, "Plug-in validation failed: Nested more than 64 levels deep"),
    (b'{"a":' * 65 + b'1' + b'}' * 65, "Plug-in validation failed: Nested more than 64 levels"),
])
def test_read_results_rejects(tmp_path, content, reason):
    (tmp_path / "results.json").write_bytes(content)
    with pytest.raises(PluginRunError) as caught:
        results.read_results(str(tmp_path), max_depth=64)
    assert str(caught.value).startswith(reason)


def test_read_results_accepts_any_extra_content(tmp_path):
    doc = {"results": {"lesionCandidates": [{"volumeId": 0, "location": [1, 2.5, 3],
                                             "confidence": "high", "rank": 1}], "other": [1]},
           "metadata": {"displayOptions": [{"volumeId": 0, "crop": {"origin": [0, 0, 0],
                                                                     "size": [1, 1, 1]}}]},
           "free": "form"}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert results.read_results(str(tmp_path), max_depth=64) == doc


def test_results_json_must_appear_within_two_seconds(tmp_path):
    started = time.monotonic()
    with pytest.raises(PluginRunError) as caught:
        results.wait_for_results(str(tmp_path))
    assert str(caught.value) == "Timeout: File out/results.json did not appear within 2000ms"
    assert 1.9 < time.monotonic() - started < 3
    threading.Timer(0.3, lambda: (tmp_path / "results.json").write_text("{}")).start()
    assert results.wait_for_results(str(tmp_path)).endswith("results.json")


def test_copy_outputs_skips_links(tmp_path):
    out, target = tmp_path / "out", tmp_path / "target"
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "deep.txt").write_text("deep")
    (out / "results.json").write_text("{}")
    (out / "passwd").symlink_to("/etc/passwd")
    (out / "linkdir").symlink_to("/etc")
    (out / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(out / "fifo")
    results.copy_outputs(str(out), str(target), **LIMITS)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert found == ["a", "a/b", "a/b/deep.txt", "results.json"]
    assert (target / "a" / "b" / "deep.txt").stat().st_mode & 0o777 == 0o444
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]   # no temporary folder left


def _fill(folder, count, size=1, prefix="f"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{prefix}{i}").write_bytes(b"x" * size)


def _assert_untouched(tmp_path, target):
    """Only what was in the target before (the job log) is there; no staging folder."""
    assert sorted(p.name for p in target.iterdir()) == [LOG_NAME]
    assert (target / LOG_NAME).read_text() == "log\n"
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]


@pytest.fixture
def target(tmp_path):
    folder = tmp_path / "target"
    folder.mkdir()
    (folder / LOG_NAME).write_text("log\n")
    return folder


def test_output_larger_than_the_limit_fails_and_copies_nothing(tmp_path, target):
    out = tmp_path / "out"
    _fill(out / "sub", 3, size=4000)            # 12000 bytes > 10000
    (out / "results.json").write_text("{}")
    with pytest.raises(PluginRunError) as caught:
        results.copy_outputs(str(out), str(target), **LIMITS)
    assert str(caught.value) == "The plug-in output is larger than 10000 bytes."
    _assert_untouched(tmp_path, target)


def test_output_with_too_many_files_fails_and_copies_nothing(tmp_path, target):
    out = tmp_path / "out"
    _fill(out, 60)
    _fill(out / "d", 41)                          # 60 + 1 folder + 41 = 102 entries > 100
    with pytest.raises(PluginRunError) as caught:
        results.copy_outputs(str(out), str(target), **LIMITS)
    assert str(caught.value) == "The plug-in output has more than 100 files and folders."
    _assert_untouched(tmp_path, target)
    _fill(tmp_path / "ok", 99)                    # 99 entries: within the limit
    results.copy_outputs(str(tmp_path / "ok"), str(target), **LIMITS)
    assert len(os.listdir(target)) == 100


def test_output_nested_too_deep_fails(tmp_path, target):
    out = tmp_path / "out"
    deep = out.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "x").write_text("x")
    with pytest.raises(PluginRunError) as caught:
        results.copy_outputs(str(out), str(target), **LIMITS)
    assert str(caught.value) == "The plug-in output is nested more than 32 folders deep."
    _assert_untouched(tmp_path, target)


def test_file_count_limit_is_reached_without_walking_every_file(tmp_path, target):
    """20,000 files against a limit of 1,000: refused after reading about 1,000 names."""
    out = tmp_path / "out"
    _fill(out, 20000, size=0)
    started = time.monotonic()
    with pytest.raises(PluginRunError):
        results.copy_outputs(str(out), str(target), max_files=1000, max_bytes=10**9)
    elapsed = time.monotonic() - started
    _assert_untouched(tmp_path, target)
    started = time.monotonic()
    os.listdir(out)                                # the floor: reading every name once
    assert elapsed < 0.5 + (time.monotonic() - started), elapsed


def test_output_growing_during_the_copy_fails_and_copies_nothing(tmp_path, target,
                                                                 monkeypatch):
    """A file that grows (or turns into a link) after the scan: the copy checks again."""
    out = tmp_path / "out"
    _fill(out, 3, size=3000)
    real_scan = results.scan_outputs

    def scan_then_tamper(*args):
        files = real_scan(*args)
        with open(out / "f2", "ab") as fh:   # 9000 bytes scanned; now 12000
            fh.write(b"y" * 3000)
        return files
    monkeypatch.setattr(results, "scan_outputs", scan_then_tamper)
    with pytest.raises(PluginRunError) as caught:
        results.copy_outputs(str(out), str(target), **LIMITS)
    assert "larger than" in str(caught.value)
    _assert_untouched(tmp_path, target)

    def scan_then_link(*args):
        files = real_scan(*args)
        (out / "f1").unlink()
        (out / "f1").symlink_to("/etc/passwd")
        return files
    (out / "f2").write_bytes(b"x")
    monkeypatch.setattr(results, "scan_outputs", scan_then_link)
    with pytest.raises(OSError):
        results.copy_outputs(str(out), str(target), **LIMITS)
    _assert_untouched(tmp_path, target)


def test_unsafe_names_are_skipped_and_logged_escaped(tmp_path, target):
    out = tmp_path / "out"
    out.mkdir()
    for name in ["a\nb.txt", "\x1b[31mred", "rtl\u202etxt.exe", "tab\there", "...",
                 "..hidden", "é.txt", "results.json", LOG_NAME]:
        (out / name).write_text("data")
    (out / "bad\x07dir").mkdir()
    (out / "bad\x07dir" / "inner.txt").write_text("x")
    fd = os.open(os.path.join(os.fsencode(out), b"latin1-\xe9.txt"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    with JobLog(str(target / LOG_NAME)) as job_log:
        results.copy_outputs(str(out), str(target), job_log, **LIMITS)
    assert sorted(os.listdir(target)) == sorted(["...", "..hidden", "é.txt", "results.json",
                                                 LOG_NAME])
    assert (target / LOG_NAME).read_text().startswith("log\n")   # the log is not replaced
    lines = (target / LOG_NAME).read_text().splitlines()[1:]
    assert len(lines) == 7, lines                  # one line per skipped name, none forged
    skipped = " ".join(lines)
    for shown in ["'a\\nb.txt'", "'\\x1b[31mred'", "'rtl\\u202etxt.exe'", "'tab\\there'",
                  "'bad\\x07dir'", "'latin1-\\udce9.txt'"]:
        assert f"Skipped {shown}: unsafe file name" in skipped
    assert f"Skipped {LOG_NAME}: the job log's name" in skipped
