"""Exports: POST /api/cases/export-mhd, POST /api/series/export-cs-volume, the CLI."""
import hashlib
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pydicom
import pytest

import exports
import storage
import worker
from dicom import volumes
from models import CaseRevision, ClinicalCase, Task, db, new_ulid
from tests.factories import make_group, make_project, make_token, make_user
from tests.sample_series import store_series

W, H, D = 320, 260, 10  # the head-first sample series
PITCH = "8.1"


@pytest.fixture
def head(app, dicom_dir):
    with app.app_context():
        return store_series(sorted((dicom_dir / "head-first").glob("*.dcm")))


def head_pixels(dicom_dir, numbers=range(1, 11)):
    paths = sorted((dicom_dir / "head-first").glob("*.dcm"))
    return np.stack([pydicom.dcmread(paths[n - 1]).pixel_array for n in numbers])


def put_blob(client, headers, data):
    sha1 = hashlib.sha1(data).hexdigest()
    res = client.put(f"/api/blob/{sha1}", data=data,
                     headers={**headers, "Content-Type": "application/octet-stream"})
    assert res.status_code == 201, res.get_json()
    return sha1


def voxel_label(client, headers, mask, origin, **data):
    """A voxel label whose box is ``mask`` (z, y, x booleans), stored as a blob."""
    d, h, w = mask.shape
    sha1 = put_blob(client, headers, np.packbits(mask.astype(np.uint8).ravel()).tobytes())
    return {"type": "voxel", "data": {"voxels": sha1, "origin": list(origin),
                                      "size": [w, h, d], "color": "#ff0000", "alpha": 1,
                                      **data}}


def make_case(client, headers, project, uid, pvd=None, labels=None):
    pvd = pvd or {"start": 1, "end": D, "delta": 1}
    res = client.post("/api/cases", json={"projectId": project, "tags": [], "series": [
        {"seriesUid": uid, "partialVolumeDescriptor": pvd}]}, headers=headers)
    assert res.status_code == 201, res.get_json()
    case_id = res.get_json()["caseId"]
    if labels is not None:
        res = client.post(f"/api/cases/{case_id}/revision", headers=headers, json={
            "description": "labels", "attributes": {"a": 1.0}, "status": "approved",
            "series": [{"seriesUid": uid, "partialVolumeDescriptor": pvd, "labels": labels}]})
        assert res.status_code == 201, res.get_json()
    return case_id


def run_worker(app):
    with app.app_context():
        worker.run_pending()


def task_of(app, task_id):
    with app.app_context():
        return db.session.get(Task, task_id).to_json()


def download(client, headers, task_id):
    res = client.get(f"/api/tasks/{task_id}/download", headers=headers)
    assert res.status_code == 200, res.get_json()
    return res.data


def tar_members(data):
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def export_mhd(client, headers, body):
    return client.post("/api/cases/export-mhd", json=body, headers=headers)


# --- export-mhd -----------------------------------------------------------------------------

def test_export_mhd_with_isolated_labels(app, client, auth_headers, default_project, head,
                                         dicom_dir):
    alice = auth_headers["alice"]
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[0, 0, 0] = mask[1, 2, 3] = mask[2, 3, 4] = True
    mask[1, :, 1] = True
    labels = [{"type": "point", "data": {"location": [1, 2, 3]}},
              voxel_label(client, alice, mask, (10, 20, 2)),
              {"type": "voxel", "data": {"voxels": None}}]
    case_id = make_case(client, alice, default_project, head, labels=labels)
    res = export_mhd(client, alice, {"caseIds": [case_id]})
    assert res.status_code == 201
    task_id = res.get_json()["taskId"]
    task = task_of(app, task_id)
    assert task["name"] == "Export a case as MHD"
    assert task["status"] == "processing" and task["downloadFileType"] == "application/x-tgz"
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "finished", task
    assert task["finishedMessage"] == "Exported 1 case(s)."
    files = tar_members(download(client, alice, task_id))
    assert list(files) == [f"{case_id}/data.json", f"{case_id}/vol000.raw",
                           f"{case_id}/vol000.mhd", f"{case_id}/vol000-label001.raw",
                           f"{case_id}/vol000-label001.mhd"]
    volume = np.frombuffer(files[f"{case_id}/vol000.raw"], "<u2").reshape(D, H, W)
    assert np.array_equal(volume, head_pixels(dicom_dir))
    assert files[f"{case_id}/vol000.mhd"].decode() == (
        f"ObjectType = Image\nNDims = 3\nDimSize = {W} {H} {D}\nElementType = MET_USHORT\n"
        f"ElementSpacing = 1.1875 1.1875 {PITCH}\nElementByteOrderMSB = False\n"
        "ElementDataFile = vol000.raw\n")
    label = np.frombuffer(files[f"{case_id}/vol000-label001.raw"], np.uint8).reshape(D, H, W)
    expected = np.zeros((D, H, W), dtype=np.uint8)
    expected[2:5, 20:24, 10:15] = mask
    assert np.array_equal(label, expected)
    assert "ElementType = MET_UCHAR\n" in files[f"{case_id}/vol000-label001.mhd"].decode()
    assert "ElementDataFile = vol000-label001.raw\n" in \
        files[f"{case_id}/vol000-label001.mhd"].decode()
    text = files[f"{case_id}/data.json"].decode()
    data = json.loads(text)
    assert list(data) == ["caseId", "createdAt", "updatedAt", "projectId", "revision"]
    assert data["caseId"] == case_id and data["projectId"] == default_project
    assert data["revision"]["description"] == "labels"
    assert text.startswith('{\n  "caseId": ') and '    "attributes": {\n      "a": 1\n    },' in text


def test_export_mhd_combined_zip_crlf(app, client, auth_headers, default_project, head):
    alice = auth_headers["alice"]
    first = np.ones((2, 2, 2), dtype=bool)
    second = np.zeros((1, 3, 3), dtype=bool)
    second[0, 1, :] = True
    labels = [voxel_label(client, alice, first, (0, 0, 0)),
              {"type": "voxel", "data": {"voxels": None}},
              voxel_label(client, alice, second, (0, 0, 1))]
    case_id = make_case(client, alice, default_project, head, labels=labels)
    res = export_mhd(client, alice, {"caseIds": [case_id], "labelPackType": "combined",
                                     "mhdLineEnding": "crlf", "compressionFormat": "zip"})
    task_id = res.get_json()["taskId"]
    run_worker(app)
    assert task_of(app, task_id)["downloadFileType"] == "application/zip"
    files = zip_members(download(client, alice, task_id))
    assert sorted(files) == sorted([f"{case_id}/data.json", f"{case_id}/vol000.raw",
                                    f"{case_id}/vol000.mhd", f"{case_id}/vol000-label.raw",
                                    f"{case_id}/vol000-label.mhd"])
    label = np.frombuffer(files[f"{case_id}/vol000-label.raw"], np.uint8).reshape(D, H, W)
    expected = np.zeros((D, H, W), dtype=np.uint8)
    expected[0:2, 0:2, 0:2] = 1
    expected[1, 1, 0:3] = 3  # the later label overwrites: value = label index + 1
    assert np.array_equal(label, expected)
    header = files[f"{case_id}/vol000-label.mhd"].decode()
    assert header.endswith("ElementDataFile = vol000-label.raw\r\n")
    assert header.count("\r\n") == 7 and "\n" not in header.replace("\r\n", "")


def test_export_mhd_follows_the_pvd(app, client, auth_headers, default_project, head,
                                    dicom_dir):
    """Quirk 21: the revision's partial volume is exported, so labels stay in place."""
    alice = auth_headers["alice"]
    pvd = {"start": 8, "end": 3, "delta": -1}
    case_id = make_case(client, alice, default_project, head, pvd=pvd, labels=[
        voxel_label(client, alice, np.ones((1, 1, 1), dtype=bool), (0, 0, 0))])
    task_id = export_mhd(client, alice, {"caseIds": [case_id]}).get_json()["taskId"]
    run_worker(app)
    files = tar_members(download(client, alice, task_id))
    volume = np.frombuffer(files[f"{case_id}/vol000.raw"], "<u2").reshape(6, H, W)
    assert np.array_equal(volume, head_pixels(dicom_dir, range(8, 2, -1)))
    assert f"DimSize = {W} {H} 6\n" in files[f"{case_id}/vol000.mhd"].decode()
    label = np.frombuffer(files[f"{case_id}/vol000-label000.raw"], np.uint8)
    assert label.size == W * H * 6 and label[0] == 1 and label.sum() == 1


def test_export_two_cases_and_an_old_revision(app, client, auth_headers, default_project,
                                              head):
    alice = auth_headers["alice"]
    one = make_case(client, alice, default_project, head, labels=[
        voxel_label(client, alice, np.ones((1, 1, 1), dtype=bool), (0, 0, 0))])
    two = make_case(client, alice, default_project, head)
    res = export_mhd(client, alice, {"caseIds": [{"caseId": one, "revisionIndex": 0}, two]})
    task_id = res.get_json()["taskId"]
    assert task_of(app, task_id)["name"] == "Export 2 cases as MHD"
    run_worker(app)
    assert task_of(app, task_id)["finishedMessage"] == "Exported 2 case(s)."
    files = tar_members(download(client, alice, task_id))
    assert json.loads(files[f"{one}/data.json"])["revision"]["description"] == \
        "Created new case."
    assert not [name for name in files if "label" in name]  # revision 0 has no label
    assert f"{two}/vol000.raw" in files


def test_export_mhd_progress_messages(app, client, auth_headers, default_project, head):
    alice = auth_headers["alice"]
    ids = [make_case(client, alice, default_project, head) for _ in range(2)]
    task_id = export_mhd(client, alice, {"caseIds": ids}).get_json()["taskId"]
    seen = []

    def progress(message, finished=None, total=None, force=False):
        seen.append((message, finished, total))
    with app.app_context():
        task = db.session.get(Task, task_id)
        assert exports.run_mhd_export(task, progress) == "Exported 2 case(s)."
    assert seen == [(f"Packing data for {ids[0]}", 0, 2), (f"Packing data for {ids[1]}", 1, 2),
                    ("Performing compression...", None, None)]


def test_export_mhd_bad_revision_index_fails_the_task(app, client, auth_headers,
                                                      default_project, head):
    alice = auth_headers["alice"]
    case_id = make_case(client, alice, default_project, head)
    res = export_mhd(client, alice, {"caseIds": [{"caseId": case_id, "revisionIndex": 5}]})
    task_id = res.get_json()["taskId"]
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "error"
    assert task["errorMessage"] == ("An internal error occurred while processing the case "
                                    "data. Invalid revision index: 5")
    assert task["endedAt"] is not None


def test_export_mhd_missing_files_fail_without_partial_archive(app, client, auth_headers,
                                                               default_project, head):
    alice = auth_headers["alice"]
    case_id = make_case(client, alice, default_project, head)
    with app.app_context():
        os.unlink(storage.instance_path(head, 6))
    task_id = export_mhd(client, alice, {"caseIds": [case_id]}).get_json()["taskId"]
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "error"
    assert task["errorMessage"] == (
        "An internal error occurred while processing the case data. "
        f"Image #6 of series {head} is missing from the storage.")
    with app.app_context():
        assert os.listdir(storage.root("downloads")) == []  # no partial file, no temp file
    res = client.get(f"/api/tasks/{task_id}/download", headers=alice)
    assert res.status_code == 409


def test_export_mhd_missing_blob_fails(app, client, auth_headers, default_project, head):
    alice = auth_headers["alice"]
    label = voxel_label(client, alice, np.ones((1, 1, 1), dtype=bool), (0, 0, 0))
    case_id = make_case(client, alice, default_project, head, labels=[label])
    with app.app_context():
        os.unlink(storage.blob_path(label["data"]["voxels"]))
    task_id = export_mhd(client, alice, {"caseIds": [case_id]}).get_json()["taskId"]
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "error" and "is missing" in task["errorMessage"]


def test_export_mhd_needs_download_volume(client, auth_headers):
    res = export_mhd(client, auth_headers["bob"], {"caseIds": []})
    assert res.status_code == 401
    assert res.get_json() == {"error": "You do not have sufficient privilege to access this "
                                       "resource.downloadVolume"}


def test_export_mhd_privilege_is_checked_before_the_body(client, auth_headers):
    res = export_mhd(client, auth_headers["bob"], {"caseIds": "not a list"})
    assert res.status_code == 401


@pytest.fixture
def carol(app, default_project):
    """downloadVolume and read on the default project only."""
    with app.app_context():
        group = make_group("exporters", privileges=["downloadVolume"], domains=["default"],
                           read_projects=[default_project])
        make_user("carol@example.com", "carol", groups=[group.group_id])
        db.session.commit()
        return {"Authorization": f"Bearer {make_token('carol@example.com')}"}


def test_export_mhd_of_unreadable_case(app, client, auth_headers, default_project, head, carol):
    readable = make_case(client, auth_headers["alice"], default_project, head)
    with app.app_context():
        other = make_project("secret")
        revision = {"creator": "x@example.com", "date": "2024-01-01T00:00:00.000Z",
                    "description": "Created new case.", "attributes": {}, "status": "draft",
                    "series": [{"seriesUid": head, "labels": []}]}
        hidden = ClinicalCase(case_id=new_ulid(), project_id=other.project_id, tags=[],
                              latest_revision=revision, domains=["default"])
        db.session.add(hidden)
        db.session.flush()
        db.session.add(CaseRevision(case_id=hidden.case_id, revision_index=0, data=revision))
        db.session.commit()
        hidden_id = hidden.case_id
    res = export_mhd(client, carol, {"caseIds": [readable, hidden_id]})
    assert res.status_code == 401
    assert res.get_json() == {"error": "You do not have enough read privilege for some cases."}
    assert export_mhd(client, carol, {"caseIds": [readable]}).status_code == 201


def test_export_mhd_of_unknown_case(client, auth_headers):
    res = export_mhd(client, auth_headers["alice"], {"caseIds": ["01hzzzzzzzzzzzzzzzzzzzzzzz"]})
    assert res.status_code == 400
    assert res.get_json() == {"error": "Some cases do not exist."}


@pytest.mark.parametrize("body", [
    {"caseIds": ["c"] * 101},
    {"caseIds": [{"caseId": "c", "revisionIndex": -1}]},
    {"caseIds": ["c"], "labelPackType": "mixed"},
    {"caseIds": ["c"], "mhdLineEnding": "cr"},
    {"caseIds": ["c"], "compressionFormat": "rar"},
    {},
])
def test_export_mhd_bad_body(client, auth_headers, body):
    res = export_mhd(client, auth_headers["alice"], body)
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_export_mhd_ignores_unknown_keys(client, auth_headers, default_project, head):
    case_id = make_case(client, auth_headers["alice"], default_project, head)
    res = export_mhd(client, auth_headers["alice"], {"caseIds": [case_id], "extra": 1})
    assert res.status_code == 201


# --- export-cs-volume -----------------------------------------------------------------------

def export_cs(client, headers, body):
    return client.post("/api/series/export-cs-volume", json=body, headers=headers)


def test_export_cs_volume(app, client, auth_headers, head, dicom_dir, tmp_path):
    alice = auth_headers["alice"]
    with app.app_context():
        lossless = store_series([dicom_dir / "misc" / "MR-phantom-lossless.dcm"])
    body = {"series": [
        {"seriesUid": head, "partialVolumeDescriptor": {"start": 2, "end": 9, "delta": 1}},
        {"seriesUid": lossless, "partialVolumeDescriptor": {"start": 1, "end": 1, "delta": 1}}]}
    res = export_cs(client, alice, body)
    assert res.status_code == 201
    task_id = res.get_json()["taskId"]
    task = task_of(app, task_id)
    assert task["name"] == "Export DICOM data"
    assert task["downloadFileType"] == "application/x-tgz"
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "finished" and task["finishedMessage"] == "exported"
    files = tar_members(download(client, alice, task_id))
    assert list(files) == ["0.mhd", "0.raw", "0.json", "1.mhd", "1.raw", "1.json"]
    with app.app_context():  # the same bytes as the plug-in input files
        volumes.write_plugin_input(head, body["series"][0]["partialVolumeDescriptor"],
                                   str(tmp_path), 0)
        volumes.write_plugin_input(lossless, body["series"][1]["partialVolumeDescriptor"],
                                   str(tmp_path), 1)
    for name in files:
        assert files[name] == (tmp_path / name).read_bytes(), name
    assert files["0.mhd"].decode().startswith("ObjectType = Image\nNDims = 3\nDimSize = 320 260 8\n")


def test_export_cs_volume_zip(app, client, auth_headers, head):
    alice = auth_headers["alice"]
    res = export_cs(client, alice, {"compressionFormat": "zip", "series": [
        {"seriesUid": head, "partialVolumeDescriptor": {"start": 1, "end": 2, "delta": 1}}]})
    task_id = res.get_json()["taskId"]
    run_worker(app)
    files = zip_members(download(client, alice, task_id))
    assert sorted(files) == ["0.json", "0.mhd", "0.raw"]
    assert len(files["0.raw"]) == W * H * 2 * 2


def test_export_cs_volume_progress(app, client, auth_headers, head):
    alice = auth_headers["alice"]
    entry = {"seriesUid": head, "partialVolumeDescriptor": {"start": 1, "end": 2, "delta": 1}}
    task_id = export_cs(client, alice, {"series": [entry, entry]}).get_json()["taskId"]
    seen = []
    with app.app_context():
        task = db.session.get(Task, task_id)
        exports.run_cs_volume_export(task, lambda m, f=None, t=None, force=False:
                                     seen.append((m, f, t)))
    assert seen == [("Processing volume #0", None, None), ("Processing volume #1", 0, 2),
                    ("Processing volume #2", 1, 2)]


def test_export_cs_volume_deleted_files(app, client, auth_headers, head):
    alice = auth_headers["alice"]
    with app.app_context():
        storage.remove_tree(storage.series_dir(head))
    res = export_cs(client, alice, {"series": [
        {"seriesUid": head, "partialVolumeDescriptor": {"start": 1, "end": 10, "delta": 1}}]})
    task_id = res.get_json()["taskId"]
    run_worker(app)
    task = task_of(app, task_id)
    assert task["status"] == "error"
    assert task["errorMessage"] == f"Image #1 of series {head} is missing from the storage."
    with app.app_context():
        assert os.listdir(storage.root("downloads")) == []
    assert client.get(f"/api/tasks/{task_id}/download", headers=alice).status_code == 409


def test_export_cs_volume_outside_domains(app, client, auth_headers, dicom_dir):
    with app.app_context():
        uid = store_series([dicom_dir / "misc" / "MR-phantom-LE.dcm"], domain="elsewhere")
    res = export_cs(client, auth_headers["alice"], {"series": [
        {"seriesUid": uid, "partialVolumeDescriptor": {"start": 1, "end": 1, "delta": 1}}]})
    assert res.status_code == 403
    assert res.get_json() == {"error": "You do not have privilege to access this series."}
    with app.app_context():
        assert db.session.execute(db.select(Task)).first() is None


def test_export_cs_volume_unknown_series(client, auth_headers):
    res = export_cs(client, auth_headers["alice"], {"series": [
        {"seriesUid": "1.2.3.999", "partialVolumeDescriptor": {"start": 1, "end": 1, "delta": 1}}]})
    assert res.status_code == 404
    assert res.get_json() == {"error": "The requested series was not found."}


@pytest.mark.parametrize("pvd, message", [
    ({"start": 1, "end": 11, "delta": 1}, "Specified range is invalid."),
    ({"start": 1, "end": 4, "delta": 2},
     'Invalid partial volume descriptor: {"start":1,"end":4,"delta":2}'),
])
def test_export_cs_volume_bad_pvd(client, auth_headers, head, pvd, message):
    res = export_cs(client, auth_headers["alice"], {"series": [
        {"seriesUid": head, "partialVolumeDescriptor": pvd}]})
    assert res.status_code == 400
    assert res.get_json() == {"error": message}


@pytest.mark.parametrize("count", [0, 11])
def test_export_cs_volume_series_count(client, auth_headers, head, count):
    entry = {"seriesUid": head, "partialVolumeDescriptor": {"start": 1, "end": 1, "delta": 1}}
    res = export_cs(client, auth_headers["alice"], {"series": [entry] * count})
    assert res.status_code == 400
    assert res.get_json()["error"] == "Request data is not correct."


def test_export_cs_volume_needs_download_volume(client, auth_headers, head):
    res = export_cs(client, auth_headers["bob"], {"series": [
        {"seriesUid": head, "partialVolumeDescriptor": {"start": 1, "end": 1, "delta": 1}}]})
    assert res.status_code == 401


# --- the command line -----------------------------------------------------------------------

def test_cli_export_case_to_one_file(app, client, auth_headers, default_project, head,
                                     tmp_path):
    alice = auth_headers["alice"]
    one = make_case(client, alice, default_project, head)
    two = make_case(client, alice, default_project, head)
    out = tmp_path / "cases.tar.gz"
    result = app.test_cli_runner().invoke(args=["export-case", one, two, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Packing data for {one}" in result.output
    names = list(tar_members(out.read_bytes()))
    assert f"{one}/vol000.raw" in names and f"{two}/data.json" in names


def test_cli_export_case_per_case_zip(app, client, auth_headers, default_project, head,
                                      tmp_path):
    case_id = make_case(client, auth_headers["alice"], default_project, head)
    result = app.test_cli_runner().invoke(
        args=["export-case", case_id, "--out", str(tmp_path / "dir"), "--zip", "-t", "combined"])
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "dir") == [f"{case_id}.zip"]
    assert f"{case_id}/vol000.mhd" in zip_members((tmp_path / "dir" / f"{case_id}.zip").read_bytes())


def test_cli_export_unknown_case(app, tmp_path):
    result = app.test_cli_runner().invoke(args=["export-case", "nope", "-o",
                                                str(tmp_path / "x.tar.gz")])
    assert result.exit_code != 0
    assert "Case nope does not exist." in result.output
    assert not (tmp_path / "x.tar.gz").exists()


@pytest.mark.parametrize("fmt", ["tgz", "zip"])
def test_write_archive_syncs_while_writing(tmp_path, monkeypatch, fmt):
    """Pages are sent to disk (fdatasync on a thread) while the archive is written; the
    archive is whole, and a failure still leaves nothing behind."""
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    monkeypatch.setattr(exports, "WRITEBACK_EVERY", 64 << 10)
    rng = np.random.default_rng(2)
    planes = [rng.integers(0, 4000, (256, 256)).astype("<i2") for _ in range(40)]  # 5 MiB

    def fill(archive):
        archive.add("v.raw", 40 * 256 * 256 * 2, iter(planes))
    path = tmp_path / f"a.{fmt}"
    exports.write_archive(str(path), fmt, fill)
    assert synced
    expected = b"".join(p.tobytes() for p in planes)
    if fmt == "tgz":
        with tarfile.open(path, "r:gz") as tar:
            assert tar.extractfile("v.raw").read() == expected
    else:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None and zf.read("v.raw") == expected

    def failing(archive):
        fill(archive)
        raise exports.ExportError("stop")
    with pytest.raises(exports.ExportError):
        exports.write_archive(str(tmp_path / f"b.{fmt}"), fmt, failing)
    assert sorted(os.listdir(tmp_path)) == [f"a.{fmt}"]
