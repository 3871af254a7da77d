"""plugins.results: results.json waiting and validation, and the copy of out/ that never
follows links."""
import json
import threading
import time

import pytest

from plugins import results
from plugins.job_log import PluginRunError


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
    results.copy_outputs(str(out), str(target), max_files=100, max_bytes=1000)
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert found == ["a", "a/b", "a/b/deep.txt", "results.json"]
    assert (target / "a" / "b" / "deep.txt").stat().st_mode & 0o777 == 0o444
