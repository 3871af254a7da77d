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


def test_stow_series_of_another_domain_is_left_out_by_the_commit(app, client, auth_headers,
                                                                 other_domain):
    # The domain of a part's series is checked by the batch's commit, under its locks: the
    # parts of that series fail (0x0110), the rest of the batch is committed, and nothing
    # of the refused parts stays in the staging folder.
    assert stow(client, other_domain, dicom_bytes(instance=1),
                path="/dicom-web/studies?domain=other").status_code == 200
    conflicting = [dicom_bytes(instance=n) for n in (2, 3)]
    fresh = [dicom_bytes(instance=n, series_uid="1.2.3.4.7") for n in (1, 2)]
    res = stow(client, auth_headers["alice"], conflicting[0], fresh[0], conflicting[1], fresh[1])
    assert res.status_code == 202
    answer = res.get_json()
    assert sop_uids(answer, "00081198") == [uid_of(p) for p in conflicting]
    assert reasons(answer) == [PROCESSING, PROCESSING]
    assert sop_uids(answer, "00081199") == [uid_of(p) for p in fresh]
    res = stow(client, auth_headers["alice"], conflicting[0])  # alone: 409
    assert res.status_code == 409 and reasons(res.get_json()) == [PROCESSING]
    with app.app_context():
        assert db.session.get(Series, "1.2.3.4.5").images == "1"
        assert db.session.get(Series, "1.2.3.4.7").images == "1-2"
        staging = storage.dicom_staging_dir("batches")
    assert os.listdir(staging) == []
    assert len(stored_files(app)) == 3


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


# --- stored data for QIDO-RS and WADO-RS -----------------------------------------------------

STUDY = "1.2.276.0.7230010.3.1.2.3289186935.22648.1590026998.0001"
HEAD = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.547"
FOOT = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.548"
MISC = {"implicit": "MR-MONO2-16-head.dcm", "lossless": "CT-phantom-lossless.dcm",
        "rgb": "MR-RGB-Head-MRA.dcm"}


def header(path):
    return pydicom.dcmread(str(path), stop_before_pixels=True)


@pytest.fixture
def stored(app, dicom_dir, other_domain):
    """head-first and foot-first (one MR study, 10 + 10 instances), an implicit-VR MR and a
    JPEG-lossless CT in "default"; an RGB MR in "other" (carol's only domain)."""
    from dicom.batch import ImportBatch
    with app.app_context():
        for domain, paths in (
                ("default", sorted((dicom_dir / "head-first").glob("*.dcm"))
                 + sorted((dicom_dir / "foot-first").glob("*.dcm"))
                 + [dicom_dir / "misc" / MISC["implicit"], dicom_dir / "misc" / MISC["lossless"]]),
                ("other", [dicom_dir / "misc" / MISC["rgb"]])):
            with ImportBatch(domain) as batch:
                for path in paths:
                    batch.add_file(str(path))
                batch.commit()
    return {name: header(dicom_dir / "misc" / file) for name, file in MISC.items()}


@pytest.fixture
def dave(app, tokens):
    """dave: domain "default" without personalInfoView."""
    with app.app_context():
        group = make_group("no-pi", domains=["default"])
        make_user("dave@example.com", "dave", groups=[group.group_id])
        db.session.commit()
        return {"Authorization": f"Bearer {make_token('dave@example.com')}"}


def hide_personal_info(app, email="alice@example.com"):
    with app.app_context():
        db.session.get(User, email).preferences = {"personalInfoView": False}
        db.session.commit()


def values(item, tag):
    return item.get(tag, {}).get("Value", [])


def qido(client, headers, path, **params):
    res = client.get("/dicom-web" + path, query_string=params, headers=headers)
    return res, (res.get_json() if res.status_code == 200 else None)


def parts_of(res):
    """(headers, body) of each part of a multipart/related answer."""
    boundary = res.mimetype_params["boundary"].encode()
    body = res.get_data()
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        parts.append((head.decode(), content[:-2]))
    return parts


# --- QIDO-RS ----------------------------------------------------------------------------

def test_search_studies_in_the_json_model(client, auth_headers, stored):
    res, found = qido(client, auth_headers["alice"], "/studies")
    assert res.status_code == 200 and res.mimetype == "application/dicom+json"
    by_uid = {values(s, "0020000D")[0]: s for s in found}
    assert set(by_uid) == {STUDY, str(stored["implicit"].StudyInstanceUID),
                           str(stored["lossless"].StudyInstanceUID)}
    study = by_uid[STUDY]
    assert study["0020000D"] == {"vr": "UI", "Value": [STUDY]}
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "TEST^MR1"}]}
    assert values(study, "00100020") == ["2018021601"]
    assert values(study, "00080020") == ["20180216"]
    assert values(study, "00080061") == ["MR"]
    assert values(study, "00201206") == [2] and values(study, "00201208") == [20]
    assert values(study, "00081190")[0].endswith(f"/dicom-web/studies/{STUDY}")


@pytest.mark.parametrize("params, expected", [
    ({"PatientName": "TEST*"}, True), ({"PatientName": "TEST^MR?"}, True),
    ({"PatientName": "NOPE*"}, False), ({"00100010": "TEST*"}, True),
    ({"PatientID": "2018021601"}, True), ({"PatientID": "x"}, False),
    ({"StudyDate": "20180101-20181231"}, True), ({"StudyDate": "-20170101"}, False),
    ({"StudyDate": "20180216"}, True), ({"StudyDate": "20190101-"}, False),
    ({"AccessionNumber": "1087190820180209"}, True), ({"ModalitiesInStudy": "CT"}, False),
    ({"ModalitiesInStudy": "MR"}, True), ({"StudyInstanceUID": f"1.2.3\\{STUDY}"}, True),
    ({"0020000D": "1.2.3"}, False),
])
def test_search_studies_matching(client, auth_headers, stored, params, expected):
    res, found = qido(client, auth_headers["alice"], "/studies", **params)
    assert res.status_code == 200
    assert (STUDY in [values(s, "0020000D")[0] for s in found]) is expected


def test_search_is_limited_to_the_callers_domains(client, auth_headers, other_domain, stored):
    _res, found = qido(client, other_domain, "/studies")
    assert [values(s, "0020000D")[0] for s in found] == [str(stored["rgb"].StudyInstanceUID)]
    # carol has no personalInfoView: no patient attributes, and no matching on them
    assert not any(tag.startswith("0010") for tag in found[0])
    res, found = qido(client, other_domain, "/studies", PatientName="NOBODY*")
    assert len(found) == 1 and "PatientName" in res.headers["Warning"]
    _res, found = qido(client, other_domain, f"/studies/{STUDY}/series")
    assert found == []


def test_search_hides_patient_attributes_for_a_preference(app, client, auth_headers, stored):
    hide_personal_info(app)
    _res, found = qido(client, auth_headers["alice"], "/series", includefield="all")
    assert found and not any(tag.startswith("0010") for item in found for tag in item)


def test_search_series_and_instances(client, auth_headers, stored):
    _res, found = qido(client, auth_headers["alice"], f"/studies/{STUDY}/series")
    assert sorted(values(s, "0020000E")[0] for s in found) == [HEAD, FOOT]
    assert all(values(s, "00080060") == ["MR"] and values(s, "00201209") == [10] for s in found)
    _res, found = qido(client, auth_headers["alice"], f"/studies/{STUDY}/series/{HEAD}/instances")
    assert [values(i, "00200013")[0] for i in found] == list(range(1, 11))
    sop = values(found[3], "00080018")[0]
    assert values(found[3], "00080016") == ["1.2.840.10008.5.1.4.1.1.4"]
    _res, found = qido(client, auth_headers["alice"], "/instances", SOPInstanceUID=sop)
    assert [values(i, "00080018")[0] for i in found] == [sop]
    assert values(found[0], "0020000D") == [STUDY] and values(found[0], "0020000E") == [HEAD]
    _res, found = qido(client, auth_headers["alice"], f"/studies/{STUDY}/instances")
    assert len(found) == 20
    _res, found = qido(client, auth_headers["alice"], "/series", Modality="CT")
    assert [values(s, "0020000E")[0] for s in found] == [
        str(stored["lossless"].SeriesInstanceUID)]
    _res, found = qido(client, auth_headers["alice"], "/series", SeriesInstanceUID=FOOT,
                       SeriesDate="20180216")
    assert [values(s, "0020000E")[0] for s in found] == [FOOT]


def test_search_limit_offset_and_includefield(client, auth_headers, stored):
    path = f"/studies/{STUDY}/series/{HEAD}/instances"
    _res, everything = qido(client, auth_headers["alice"], path)
    res, found = qido(client, auth_headers["alice"], path, limit="3", offset="2")
    assert found == everything[2:5]
    assert "more" in res.headers.get("Warning", "")
    _res, found = qido(client, auth_headers["alice"], "/studies", StudyInstanceUID=STUDY,
                       includefield="00081030,StudyID")
    assert "00081030" in found[0] and "00200010" in found[0]


@pytest.mark.parametrize("params", [{"StudyDate": "2018-01-01"}, {"StudyDate": "20181301-"},
                                    {"limit": "-1"}, {"offset": "x"}, {"limit": "1e3"}])
def test_search_bad_values_are_400(client, auth_headers, stored, params):
    res, _found = qido(client, auth_headers["alice"], "/studies", **params)
    assert res.status_code == 400
    assert "error" in res.get_json()


def test_search_unknown_keys_are_ignored_with_a_warning(client, auth_headers, stored):
    res, found = qido(client, auth_headers["alice"], "/studies", BodyPartExamined="HEAD",
                      NotAKeyword="1", fuzzymatching="false")
    assert res.status_code == 200 and len(found) == 3
    assert res.headers["Warning"].startswith("299 ")
    assert "BodyPartExamined" in res.headers["Warning"]
    assert "NotAKeyword" in res.headers["Warning"]
    assert "fuzzymatching" not in res.headers["Warning"]


def test_search_without_or_with_a_bad_token_is_401(client, stored):
    assert client.get("/dicom-web/studies").status_code == 401
    assert client.get("/dicom-web/series", headers={
        "Authorization": "Bearer " + "f" * 40}).status_code == 401


def test_search_with_an_accept_it_cannot_give_is_406(client, auth_headers, stored):
    res = client.get("/dicom-web/studies", headers={**auth_headers["alice"],
                                                     "Accept": "application/dicom+xml"})
    assert res.status_code == 406
    res = client.get("/dicom-web/studies", headers={**auth_headers["alice"],
                                                     "Accept": "application/json"})
    assert res.status_code == 200


# --- WADO-RS ----------------------------------------------------------------------------

def test_retrieve_series_streams_the_stored_files(app, client, auth_headers, dicom_dir, stored):
    res = client.get(f"/dicom-web/studies/{STUDY}/series/{HEAD}", headers=auth_headers["alice"])
    assert res.status_code == 200
    assert res.mimetype == "multipart/related"
    assert res.mimetype_params["type"] == "application/dicom"
    parts = parts_of(res)
    assert len(parts) == 10
    expected = sorted((dicom_dir / "head-first").glob("*.dcm"))
    for (head, content), path in zip(parts, expected):
        assert "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1" in head
        assert content == path.read_bytes()


def test_retrieve_study_and_instance(client, auth_headers, stored):
    res = client.get(f"/dicom-web/studies/{STUDY}", headers=auth_headers["alice"])
    assert len(parts_of(res)) == 20
    _res, found = qido(client, auth_headers["alice"], f"/studies/{STUDY}/series/{FOOT}/instances",
                       InstanceNumber="4")
    sop = values(found[0], "00080018")[0]
    res = client.get(f"/dicom-web/studies/{STUDY}/series/{FOOT}/instances/{sop}",
                     headers=auth_headers["alice"])
    [(_head, content)] = parts_of(res)
    assert str(pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID) == sop


@pytest.mark.parametrize("name", ["implicit", "lossless"])
def test_retrieve_default_syntax_is_explicit_little_endian(client, auth_headers, dicom_dir,
                                                            stored, name):
    ds = stored[name]
    path = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    original = pydicom.dcmread(str(dicom_dir / "misc" / MISC[name]))
    [(head, content)] = parts_of(client.get(path, headers=auth_headers["alice"]))
    assert head.endswith("transfer-syntax=1.2.840.10008.1.2.1")
    sent = pydicom.dcmread(io.BytesIO(content))
    assert sent.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (sent.pixel_array == original.pixel_array).all()
    # transfer-syntax=* gives the file as stored
    [(head, content)] = parts_of(client.get(path, headers={
        **auth_headers["alice"],
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}))
    assert head.endswith(f"transfer-syntax={original.file_meta.TransferSyntaxUID}")
    assert content == (dicom_dir / "misc" / MISC[name]).read_bytes()


@pytest.mark.parametrize("accept", [
    "application/zip", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
    'multipart/related; type="application/octet-stream"'])
def test_retrieve_with_an_accept_it_cannot_give_is_406(client, auth_headers, stored, accept):
    res = client.get(f"/dicom-web/studies/{STUDY}", headers={**auth_headers["alice"],
                                                             "Accept": accept})
    assert res.status_code == 406
    assert "error" in res.get_json()


def test_retrieve_needs_personal_info_view(client, dave, stored):
    res = client.get(f"/dicom-web/studies/{STUDY}/series/{HEAD}", headers=dave)
    assert res.status_code == 403
    assert client.get(f"/dicom-web/studies/{STUDY}/series/{HEAD}/metadata",
                      headers=dave).status_code == 200


def test_a_study_of_another_domain_is_404_without_a_hint(client, other_domain, stored):
    answers = [client.get(f"/dicom-web/studies/{uid}{tail}", headers=other_domain)
               for uid in (STUDY, "1.2.3.404") for tail in ("", "/metadata")]
    assert {res.status_code for res in answers} == {404}
    assert len({res.get_data() for res in answers}) == 1


def test_metadata_in_the_json_model(app, client, auth_headers, dave, stored):
    res = client.get(f"/dicom-web/studies/{STUDY}/series/{HEAD}/metadata",
                     headers=auth_headers["alice"])
    assert res.status_code == 200 and res.mimetype == "application/dicom+json"
    found = res.get_json()
    assert len(found) == 10
    assert values(found[0], "00100010") == [{"Alphabetic": "TEST^MR1"}]
    assert values(found[0], "0020000E") == [HEAD]
    assert values(found[0], "00280010") == [260] and "7FE00010" not in found[0]
    for headers in (dave, None):
        if headers is None:
            hide_personal_info(app)
            headers = auth_headers["alice"]
        found = client.get(f"/dicom-web/studies/{STUDY}/metadata", headers=headers).get_json()
        assert len(found) == 20
        assert not any(tag.startswith("0010") for item in found for tag in item)


def test_frames_are_uncompressed_octet_streams(client, auth_headers, dicom_dir, dave, stored):
    for name in ("implicit", "lossless"):
        ds = stored[name]
        original = pydicom.dcmread(str(dicom_dir / "misc" / MISC[name]))
        path = (f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}/frames/1")
        res = client.get(path, headers=dave)  # frames need only the domain
        assert res.status_code == 200
        assert res.mimetype_params["type"] == "application/octet-stream"
        [(head, content)] = parts_of(res)
        assert "application/octet-stream" in head
        assert content == original.pixel_array.astype("<i2" if original.PixelRepresentation
                                                      else "<u2").tobytes()


@pytest.mark.parametrize("frames, status", [("2", 404), ("1,2", 404), ("0", 400), ("x", 400),
                                            ("1,", 400)])
def test_frame_numbers(client, auth_headers, stored, frames, status):
    ds = stored["implicit"]
    res = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                     f"/instances/{ds.SOPInstanceUID}/frames/{frames}",
                     headers=auth_headers["alice"])
    assert res.status_code == status
    assert "error" in res.get_json()


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_rendered_and_thumbnails_are_png(client, auth_headers, dave, stored):
    ds = stored["lossless"]
    base = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    instance = f"{base}/instances/{ds.SOPInstanceUID}"
    res = client.get(instance + "/rendered", headers=dave)
    assert res.status_code == 200 and res.mimetype == "image/png"
    assert png_size(res.get_data()) == (512, 512)
    narrow = client.get(instance + "/rendered?window=40,80", headers=dave).get_data()
    assert png_size(narrow) == (512, 512) and narrow != res.get_data()
    res = client.get(instance + "/frames/1/rendered?viewport=100,50", headers=dave)
    assert png_size(res.get_data()) == (50, 50)
    for path in (base + "/thumbnail", instance + "/thumbnail",
                 f"/dicom-web/studies/{STUDY}/thumbnail"):
        res = client.get(path, headers={**dave, "Accept": "image/*"})
        assert res.status_code == 200 and max(png_size(res.get_data())) <= 128


@pytest.mark.parametrize("query, accept, status", [
    ("", "image/jpeg", 406), ("?window=40", "image/png", 400), ("?window=40,0", "", 400),
    ("?viewport=0,10", "", 400), ("?window=a,b", "", 400)])
def test_rendered_bad_requests(client, auth_headers, stored, query, accept, status):
    ds = stored["lossless"]
    res = client.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                     f"/instances/{ds.SOPInstanceUID}/rendered{query}",
                     headers={**auth_headers["alice"], "Accept": accept})
    assert res.status_code == status
    assert "error" in res.get_json()


def test_stored_instance_is_found_by_search_and_retrieve(client, auth_headers):
    data = dicom_bytes(instance=7)
    assert stow(client, auth_headers["alice"], data).status_code == 200
    _res, found = qido(client, auth_headers["alice"], "/instances", StudyInstanceUID="1.2.3.4")
    assert [values(i, "00080018")[0] for i in found] == [uid_of(data)]
    [(_head, content)] = parts_of(client.get(
        f"/dicom-web/studies/1.2.3.4/series/1.2.3.4.5/instances/{uid_of(data)}",
        headers=auth_headers["alice"]))
    assert content == data


def test_openapi_describes_the_dicomweb_routes(client, auth_headers):
    paths = client.get("/api/openapi.json", headers=auth_headers["alice"]).get_json()["paths"]
    frames = "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"
    assert paths[frames]["get"]["summary"].startswith("WADO-RS")
    assert paths["/dicom-web/studies"]["post"]["summary"].startswith("STOW-RS")
    assert paths["/dicom-web/series"]["get"]["summary"].startswith("QIDO-RS")


def test_search_patient_birth_date_is_a_da_value(client, auth_headers):
    assert stow(client, auth_headers["alice"], dicom_bytes()).status_code == 200
    _res, found = qido(client, auth_headers["alice"], "/studies", includefield="PatientBirthDate")
    assert values(found[0], "00100030") == ["19700101"]
    _res, found = qido(client, auth_headers["alice"], "/instances")
    assert values(found[0], "00280010") == [4] and "00020010" not in found[0]


def test_frames_of_a_multi_frame_instance(client, auth_headers):
    import numpy as np
    pixels = np.arange(3 * 4 * 4, dtype="<i2").reshape(3, 4, 4)
    data = dicom_bytes(NumberOfFrames=3, PixelData=pixels.tobytes())
    assert stow(client, auth_headers["alice"], data).status_code == 200
    base = f"/dicom-web/studies/1.2.3.4/series/1.2.3.4.5/instances/{uid_of(data)}"
    res = client.get(base + "/frames/3,1", headers=auth_headers["alice"])
    assert [content for _head, content in parts_of(res)] == [pixels[2].tobytes(),
                                                             pixels[0].tobytes()]
    assert client.get(base + "/frames/4", headers=auth_headers["alice"]).status_code == 404
    res = client.get(base + "/frames/2/rendered", headers=auth_headers["alice"])
    assert res.status_code == 200 and png_size(res.get_data()) == (4, 4)
    res = client.get(base + "/frames/1,2/rendered", headers=auth_headers["alice"])
    assert res.status_code == 400


def test_search_answers_at_most_max_results(client, auth_headers, stored, monkeypatch):
    from dicom import web
    monkeypatch.setattr(web, "MAX_RESULTS", 4)
    for params in ({}, {"limit": "100"}):
        res, found = qido(client, auth_headers["alice"], f"/studies/{STUDY}/instances", **params)
        assert len(found) == 4 and "more" in res.headers["Warning"]


def test_search_warning_header_holds_only_safe_text(client, auth_headers, stored):
    res = client.get("/dicom-web/studies?%E6%BC%A2=1&a%0D%0AX-Evil:%201=2&q%22uote=3",
                     headers=auth_headers["alice"])
    assert res.status_code == 200
    warning = res.headers["Warning"]
    assert "X-Evil" in warning and "\r" not in warning and "\n" not in warning
    assert warning.isascii() and warning.count('"') == 2
