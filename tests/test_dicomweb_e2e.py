"""/dicom-web with a real client: dicomweb-client (what Python scripts and AI pipelines use)
against a real gunicorn started as the README does (init-db, add-permanent-token)."""
import io
import os
import sys

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests.conftest import DICOM_DIR
from tests.dicom_factory import dicom_bytes
from tests.scratch_db import scratch_database_url
from tests.test_e2e import Server, flask_cli, process_env

pytestmark = pytest.mark.e2e
HEAD = DICOM_DIR / "head-first"
LOSSLESS = DICOM_DIR / "misc" / "CT-phantom-lossless.dcm"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicomweb-e2e")
    with scratch_database_url() as database_url:
        env = process_env(tmp / "data", database_url)
        srv = Server(tmp, env)
        flask_cli(env, "init-db")
        srv.token = flask_cli(env, "add-permanent-token", "circus").strip().splitlines()[-1]
        srv.start("gunicorn", [sys.executable, "-m", "gunicorn", "-b", srv.base[7:],
                               "--no-control-socket", "app:create_app()"])
        try:
            srv.wait_until_up()
            yield srv
        finally:
            codes = srv.stop()
        assert codes == {"gunicorn": 0}, srv.log("gunicorn")


@pytest.fixture(scope="module")
def dicomweb(server):
    return DICOMwebClient(url=server.base + "/dicom-web",
                          headers={"Authorization": f"Bearer {server.token}"})


@pytest.fixture(scope="module")
def stored(dicomweb):
    """The head-first series and the JPEG-lossless CT, stored with STOW-RS."""
    datasets = [pydicom.dcmread(str(p)) for p in sorted(HEAD.glob("*.dcm"))]
    datasets.append(pydicom.dcmread(str(LOSSLESS)))
    answer = dicomweb.store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 11
    assert "FailedSOPSequence" not in answer
    return datasets


def test_a_client_without_token_is_refused(server):
    client = DICOMwebClient(url=server.base + "/dicom-web")
    with pytest.raises(requests.HTTPError) as raised:
        client.search_for_studies()
    assert raised.value.response.status_code == 401


def test_search(dicomweb, stored):
    head = stored[0]
    studies = dicomweb.search_for_studies(search_filters={"PatientName": "TEST*"})
    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in studies] == [
        head.StudyInstanceUID]
    series = dicomweb.search_for_series(search_filters={"Modality": "CT"})
    assert [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in series] == [
        stored[-1].SeriesInstanceUID]
    instances = dicomweb.search_for_instances(
        study_instance_uid=head.StudyInstanceUID, series_instance_uid=head.SeriesInstanceUID,
        limit=3, offset=1)
    assert [pydicom.Dataset.from_json(i).InstanceNumber for i in instances] == [2, 3, 4]
    found = dicomweb.search_for_studies(fields=["StudyDescription"],
                                        search_filters={"StudyDate": "20180101-20181231"})
    assert len(found) == 1


def test_retrieve_series_and_instance(dicomweb, stored):
    head = stored[0]
    got = dicomweb.retrieve_series(head.StudyInstanceUID, head.SeriesInstanceUID)
    assert sorted(int(ds.InstanceNumber) for ds in got) == list(range(1, 11))
    assert (got[0].pixel_array == stored[int(got[0].InstanceNumber) - 1].pixel_array).all()
    ct = stored[-1]
    one = dicomweb.retrieve_instance(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID,
        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),))
    assert one.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # decoded
    assert (one.pixel_array == ct.pixel_array).all()
    # the client's default for one instance is transfer-syntax=*: as stored
    as_stored = dicomweb.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                           ct.SOPInstanceUID)
    assert as_stored.file_meta.TransferSyntaxUID == ct.file_meta.TransferSyntaxUID
    assert (as_stored.pixel_array == ct.pixel_array).all()


def test_metadata(dicomweb, stored):
    head = stored[0]
    metadata = dicomweb.retrieve_series_metadata(head.StudyInstanceUID, head.SeriesInstanceUID)
    assert len(metadata) == 10
    first = pydicom.Dataset.from_json(metadata[0])
    assert first.SeriesInstanceUID == head.SeriesInstanceUID and first.PatientName == "TEST^MR1"
    one = dicomweb.retrieve_instance_metadata(head.StudyInstanceUID, head.SeriesInstanceUID,
                                              head.SOPInstanceUID)
    assert pydicom.Dataset.from_json(one).SOPInstanceUID == head.SOPInstanceUID


def test_frames(dicomweb, stored):
    ct = stored[-1]
    [frame] = dicomweb.retrieve_instance_frames(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                                ct.SOPInstanceUID, frame_numbers=[1])
    pixels = np.frombuffer(frame, dtype="<i2" if ct.PixelRepresentation else "<u2")
    assert (pixels.reshape(ct.Rows, ct.Columns) == ct.pixel_array).all()


def test_rendered(dicomweb, stored):
    ct = stored[-1]
    png = dicomweb.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                              ct.SOPInstanceUID, media_types=("image/png",))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_reports_failures(dicomweb, stored, server):
    study = stored[0].StudyInstanceUID
    # Read back from Part 10 bytes: dicomweb-client writes a dataset as it is, and only a
    # dataset read from a file has the preamble STOW-RS parts need.
    stray = pydicom.dcmread(io.BytesIO(dicom_bytes(study_uid="1.2.3.999",
                                                   series_uid="1.2.3.999.1")))
    match = pydicom.dcmread(io.BytesIO(dicom_bytes(study_uid=study, series_uid="1.2.3.999.2")))
    answer = dicomweb.store_instances([match, stray], study_instance_uid=study)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
        match.SOPInstanceUID]
    [failed] = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == stray.SOPInstanceUID
    assert failed.FailureReason == 0xC409
