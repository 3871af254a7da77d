"""/dicom-web: QIDO-RS, WADO-RS and STOW-RS with the Flask test client (tests/test_dicomweb_e2e.py
drives the same routes with dicomweb-client against gunicorn)."""
import io
import os

import pydicom
import pytest

import storage
from models import Series, ServerParam, User, db
from tests.dicom_factory import dicom_bytes
from tests.factories import make_group, make_token, make_user

BOUNDARY = "dicomweb-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
C000, C409, PROCESSING = 0xC000, 0xC409, 0x0110


def related(*parts, boundary=BOUNDARY, content_type="application/dicom"):
    """A multipart/related body of the given parts (bytes)."""
    body = b""
    for part in parts:
        body += (f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
                 + part + b"\r\n")
    return body + f"--{boundary}--\r\n".encode()


def stow(client, headers, *parts, path="/dicom-web/studies", content_type=STOW_TYPE, **kw):
    return client.post(path, data=related(*parts, **kw), headers=headers,
                       content_type=content_type)


def sop_uids(answer, key):
    return [item["00081155"]["Value"][0] for item in answer.get(key, {}).get("Value", [])
            if "00081155" in item]


def reasons(answer):
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


def uid_of(data):
    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


@pytest.fixture
def other_domain(app, tokens):
    """Domain "other" exists; carol holds only it and has no personalInfoView."""
    with app.app_context():
        db.session.get(ServerParam, "domains").value = ["default", "other"]
        group = make_group("others", domains=["other"])
        make_user("carol@example.com", "carol", groups=[group.group_id])
        db.session.commit()
        return {"Authorization": f"Bearer {make_token('carol@example.com')}"}


def stored_files(app):
    root = os.path.join(app.config["CIRCUS_DATA_DIR"])
    found = []
    for folder, _dirs, names in os.walk(root):
        found += [os.path.join(folder, n) for n in names
                  if "dicom" in folder and not n.endswith((".sqlite", ".db"))]
    return sorted(found)


# --- STOW-RS ----------------------------------------------------------------------------

def test_stow_stores_every_part(app, client, auth_headers):
    parts = [dicom_bytes(instance=n, series_uid="1.2.3.4.5") for n in (1, 2, 3)]
    res = stow(client, auth_headers["alice"], *parts)
    assert res.status_code == 200, res.get_data(as_text=True)
    assert res.mimetype == "application/dicom+json"
    answer = res.get_json()
    assert sop_uids(answer, "00081199") == [uid_of(p) for p in parts]
    assert "00081198" not in answer
    assert answer["00081190"]["Value"][0].endswith("/dicom-web/studies/1.2.3.4")
    first = answer["00081199"]["Value"][0]
    assert first["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert first["00081190"]["Value"][0].endswith(
        f"/studies/1.2.3.4/series/1.2.3.4.5/instances/{uid_of(parts[0])}")
    with app.app_context():
        series = db.session.get(Series, "1.2.3.4.5")
        assert series.domain == "default" and series.images == "1-3"
        with open(storage.instance_path("1.2.3.4.5", 2), "rb") as fh:
            assert fh.read() == parts[1]
    assert len(stored_files(app)) == 3


def test_stow_into_a_named_domain(app, client, auth_headers, other_domain):
    res = stow(client, other_domain, dicom_bytes(), path="/dicom-web/studies?domain=other")
    assert res.status_code == 200
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").domain == "other"


def test_stow_default_domain_follows_the_server_param(app, client, other_domain):
    # carol holds only "other": the first of domains ("default") is refused to her...
    assert stow(client, other_domain, dicom_bytes()).status_code == 403
    with app.app_context():
        db.session.add(ServerParam(key="defaultDomain", value="other"))
        db.session.commit()
    # ...and the server's defaultDomain is used when set.
    assert stow(client, other_domain, dicom_bytes()).status_code == 200
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").domain == "other"


@pytest.mark.parametrize("query, status", [("?domain=other", 403), ("?domain=nowhere", 400)])
def test_stow_domain_the_caller_lacks_or_that_does_not_exist(app, client, auth_headers,
                                                             other_domain, query, status):
    res = stow(client, auth_headers["alice"], dicom_bytes(), path="/dicom-web/studies" + query)
    assert res.status_code == status
    assert "error" in res.get_json()
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5") is None


def test_stow_guest_without_domain_is_refused(client, auth_headers):
    assert stow(client, auth_headers["guest"], dicom_bytes()).status_code == 403


def test_stow_without_token_is_401(client):
    assert stow(client, {}, dicom_bytes()).status_code == 401
    assert stow(client, {"Authorization": "Bearer " + "0" * 40},
                dicom_bytes()).status_code == 401


def test_stow_one_bad_part_does_not_spoil_the_others(app, client, auth_headers):
    good = dicom_bytes(instance=1)
    res = stow(client, auth_headers["alice"], good, b"this is not DICOM at all" * 10)
    assert res.status_code == 202
    answer = res.get_json()
    assert sop_uids(answer, "00081199") == [uid_of(good)]
    assert reasons(answer) == [C000]
    # a part that is not DICOM has no UIDs to report
    assert answer["00081198"]["Value"][0].keys() == {"00081197"}
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1"


def test_stow_truncated_part(app, client, auth_headers):
    truncated = dicom_bytes(instance=2)[:-10]
    res = stow(client, auth_headers["alice"], dicom_bytes(instance=1), truncated)
    assert res.status_code == 202
    answer = res.get_json()
    assert reasons(answer) == [C000]
    assert sop_uids(answer, "00081198") == [uid_of(truncated)]
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1"
    assert not os.path.exists(storage_path(app, "1.2.3.4.5", 2))


def storage_path(app, series_uid, number):
    with app.app_context():
        return storage.instance_path(series_uid, number)


def test_stow_all_failed_is_409_and_leaves_nothing(app, client, auth_headers):
    res = stow(client, auth_headers["alice"], b"nope", dicom_bytes()[:400])
    assert res.status_code == 409
    assert reasons(res.get_json()) == [C000, C000]
    assert sop_uids(res.get_json(), "00081199") == []
    with app.app_context():
        assert db.session.execute(db.select(Series)).first() is None
    assert stored_files(app) == []


def test_stow_study_in_path_must_match(app, client, auth_headers):
    match = dicom_bytes(instance=1, study_uid="1.2.3.4")
    other = dicom_bytes(instance=2, study_uid="1.2.3.99", series_uid="1.2.3.99.1")
    res = stow(client, auth_headers["alice"], match, other, path="/dicom-web/studies/1.2.3.4")
    assert res.status_code == 202
    answer = res.get_json()
    assert sop_uids(answer, "00081199") == [uid_of(match)]
    assert sop_uids(answer, "00081198") == [uid_of(other)]
    assert reasons(answer) == [C409]
    with app.app_context():
        assert db.session.get(Series, "1.2.3.99.1") is None


def test_stow_instance_of_a_series_in_another_domain(app, client, auth_headers, other_domain):
    assert stow(client, other_domain, dicom_bytes(instance=1),
                path="/dicom-web/studies?domain=other").status_code == 200
    conflicting = dicom_bytes(instance=2)  # same series, now sent to "default"
    fresh = dicom_bytes(instance=1, series_uid="1.2.3.4.6")
    res = stow(client, auth_headers["alice"], conflicting, fresh)
    assert res.status_code == 202
    answer = res.get_json()
    assert sop_uids(answer, "00081198") == [uid_of(conflicting)]
    assert reasons(answer) == [PROCESSING]
    assert sop_uids(answer, "00081199") == [uid_of(fresh)]
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1"
        assert db.session.get(Series, "1.2.3.4.6").domain == "default"
    assert not os.path.exists(storage_path(app, "1.2.3.4.5", 2))


def test_stow_instance_the_importer_refuses(client, auth_headers):
    res = stow(client, auth_headers["alice"], dicom_bytes(InstanceNumber=None))
    assert res.status_code == 409
    assert reasons(res.get_json()) == [PROCESSING]


@pytest.mark.parametrize("content_type, status", [
    ("application/dicom", 415),
    ("multipart/form-data; boundary=" + BOUNDARY, 415),
    ('multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY, 415),
    ('multipart/related; type="application/dicom"', 400),
])
def test_stow_body_that_is_not_multipart_related_dicom(client, auth_headers, content_type,
                                                       status):
    res = stow(client, auth_headers["alice"], dicom_bytes(), content_type=content_type)
    assert res.status_code == status
    assert "error" in res.get_json()


def test_stow_malformed_multipart_body(app, client, auth_headers):
    body = related(dicom_bytes())[:-30]  # the closing delimiter is missing
    res = client.post("/dicom-web/studies", data=body, headers=auth_headers["alice"],
                      content_type=STOW_TYPE)
    assert res.status_code == 400
    assert stored_files(app) == []


def test_stow_part_of_another_media_type(client, auth_headers):
    res = stow(client, auth_headers["alice"], dicom_bytes(), content_type=STOW_TYPE)
    assert res.status_code == 200
    res = client.post("/dicom-web/studies", headers=auth_headers["alice"],
                      content_type=STOW_TYPE,
                      data=related(b'{"00100010": {}}', content_type="application/json"))
    assert res.status_code == 409
    assert reasons(res.get_json()) == [C000]


def test_stow_part_too_large_is_413(app, client, auth_headers):
    app.config["UPLOAD_FILE_SIZE_MAX_BYTES"] = 100
    res = stow(client, auth_headers["alice"], dicom_bytes())
    assert res.status_code == 413
    assert stored_files(app) == []
