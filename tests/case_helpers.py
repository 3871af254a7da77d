"""Helpers shared by the case, revision, my-list and CLI tests (no tests in here)."""
import shutil

import pydicom

import storage
from models import db
from tests.factories import make_group, make_series, make_token, make_user

UID1 = "1.2.840.1.1"
UID2 = "1.2.840.1.2"
UID_OTHER_DOMAIN = "1.2.840.9.1"


def pvd(start=1, end=10, delta=1):
    return {"start": start, "end": end, "delta": delta}


def seed_series(app):
    """Two series of 10 images in domain default, one in domain sirius."""
    with app.app_context():
        make_series(UID1, images="1-10", patient_info={
            "patientId": "P1", "patientName": "Anzu", "age": 30, "sex": "F"})
        make_series(UID2, images="1-5,8-9", patient_info={
            "patientId": "P2", "patientName": "Koume", "age": 70, "sex": "M"})
        make_series(UID_OTHER_DOMAIN, domain="sirius", images="1-10")
        db.session.commit()


def persona(app, email, privileges=(), domains=("default",), preferences=None, **roles):
    """A user in a new group with the given privileges, domains and project roles
    (``read_projects=[pid]``, ...); returns auth headers."""
    with app.app_context():
        group = make_group(email + " group", privileges=list(privileges),
                           domains=list(domains), **roles)
        make_user(email, email.split("@")[0], groups=[group.group_id],
                  preferences=preferences if preferences is not None
                  else {"personalInfoView": True})
        db.session.commit()
        return {"Authorization": f"Bearer {make_token(email)}"}


def create_case(client, headers, project_id, series=None, tags=()):
    body = {"projectId": project_id,
            "series": series if series is not None else [
                {"seriesUid": UID1, "partialVolumeDescriptor": pvd()}],
            "tags": list(tags)}
    res = client.post("/api/cases", json=body, headers=headers)
    assert res.status_code == 201, res.get_json()
    return res.get_json()["caseId"]


def revision(series_uid=UID1, labels=(), **fields):
    body = {"description": "edited", "attributes": {}, "status": "approved",
            "series": [{"seriesUid": series_uid, "partialVolumeDescriptor": pvd(),
                        "labels": list(labels)}]}
    body.update(fields)
    return body


def import_shared_series(app, folder):
    """Copy the real DICOM files of a shared folder into storage; return the series UID."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
    numbers = []
    with app.app_context():
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            number = int(ds.InstanceNumber)
            target = storage.instance_path(uid, number)
            storage.os.makedirs(storage.os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)
            numbers.append(number)
        numbers.sort()
        images = (f"{numbers[0]}-{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1))
                  else ",".join(map(str, numbers)))
        make_series(uid, images=images)
        db.session.commit()
    return uid
