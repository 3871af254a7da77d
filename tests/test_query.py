"""The instance index (written by every import) and DICOM attribute matching over it."""
import os

import pytest
import sqlalchemy as sa

from dicom import importer, query
from dicom.batch import ImportBatch
from models import Instance, Series, ServerParam, db
from tests.dicom_factory import dicom_bytes

STUDY_A, STUDY_B = "1.2.3.10", "1.2.3.20"


def _import(domain, *instances):
    with ImportBatch(domain) as batch:
        for kwargs in instances:
            batch.add_bytes(dicom_bytes(**kwargs))
        batch.commit()


@pytest.fixture
def ctx(app):
    with app.app_context():
        db.session.get(ServerParam, "domains").value = ["default", "other"]
        db.session.commit()
        yield app


@pytest.fixture
def stored(ctx):
    """Study A: a CT (3 instances) and an MR (1) of Doe; study B: a CT of Roe in "other"."""
    _import("default",
            *[dict(series_uid="1.2.3.11", study_uid=STUDY_A, instance=n, modality="CT",
                   PatientName="Doe^John", PatientID="P1", StudyDate="20200102",
                   AccessionNumber="ACC1", StudyDescription="Chest", SeriesNumber=2,
                   SOPInstanceUID=f"1.2.3.11.{n}") for n in (1, 2, 3)],
            dict(series_uid="1.2.3.12", study_uid=STUDY_A, instance=1, modality="MR",
                 PatientName="Doe^John", PatientID="P1", StudyDate="20200102",
                 AccessionNumber="ACC1", SOPInstanceUID="1.2.3.12.1"))
    _import("other", dict(series_uid="1.2.3.21", study_uid=STUDY_B, instance=1,
                          modality="CT", PatientName="Roe^Jane", PatientID="P2",
                          StudyDate="20210505", AccessionNumber="ACC2",
                          SOPInstanceUID="1.2.3.21.1"))


def _find(level, keys, domains=("default", "other"), **options):
    matches, ignored = query.find(level, keys, list(domains), **options)
    return matches, ignored


def test_every_import_writes_the_instances_rows_and_study_columns(stored):
    rows = db.session.execute(sa.select(Instance).order_by(
        Instance.series_uid, Instance.instance_number)).scalars().all()
    assert [(r.series_uid, r.instance_number, r.sop_instance_uid) for r in rows] == [
        ("1.2.3.11", 1, "1.2.3.11.1"), ("1.2.3.11", 2, "1.2.3.11.2"),
        ("1.2.3.11", 3, "1.2.3.11.3"), ("1.2.3.12", 1, "1.2.3.12.1"),
        ("1.2.3.21", 1, "1.2.3.21.1")]
    assert rows[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert rows[0].transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert (rows[0].rows, rows[0].columns, rows[0].number_of_frames) == (4, 4, None)
    series = db.session.get(Series, "1.2.3.11")
    assert (series.study_date, series.accession_number, series.study_description,
            series.series_number) == ("20200102", "ACC1", "Chest", 2)


def test_a_replaced_instance_updates_its_row_and_a_deleted_series_drops_them(stored):
    _import("default", dict(series_uid="1.2.3.11", study_uid=STUDY_A, instance=2,
                            SOPInstanceUID="1.2.3.11.99"))
    row = db.session.get(Instance, ("1.2.3.11", 2))
    assert row.sop_instance_uid == "1.2.3.11.99"
    db.session.execute(sa.delete(Series).where(Series.series_uid == "1.2.3.11"))
    db.session.commit()
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Instance).where(
        Instance.series_uid == "1.2.3.11")) == 0


def test_study_level_aggregates_its_visible_series(stored):
    matches, ignored = _find("STUDY", {"PatientName": "doe*", "ModalitiesInStudy": "",
                                       "StudyInstanceUID": ""})
    assert ignored == []
    [study] = matches
    assert study["StudyInstanceUID"] == STUDY_A and study["PatientName"] == "Doe^John"
    assert study["ModalitiesInStudy"] == ["CT", "MR"]
    assert (study["NumberOfStudyRelatedSeries"], study["NumberOfStudyRelatedInstances"]) == (2, 4)
    assert study["AccessionNumber"] == "ACC1" and study["StudyDate"] == "20200102"


@pytest.mark.parametrize("keys, expected", [
    ({"StudyDate": "20200101-20201231"}, [STUDY_A]),
    ({"StudyDate": "-20200102"}, [STUDY_A]),
    ({"StudyDate": "20200103-"}, [STUDY_B]),
    ({"StudyDate": "20210505"}, [STUDY_B]),
    ({"ModalitiesInStudy": "MR"}, [STUDY_A]),
    ({"ModalitiesInStudy": "CT"}, [STUDY_A, STUDY_B]),
    ({"ModalitiesInStudy": "MR\\XA"}, [STUDY_A]),
    ({"StudyInstanceUID": f"{STUDY_B}\\9.9.9"}, [STUDY_B]),
    ({"AccessionNumber": "ACC?"}, [STUDY_A, STUDY_B]),
    ({"PatientID": "P2"}, [STUDY_B]),
    ({"PatientName": "R?E^*"}, [STUDY_B]),
])
def test_study_matching(stored, keys, expected):
    matches, _ = _find("STUDY", keys)
    assert [m["StudyInstanceUID"] for m in matches] == expected


def test_only_the_given_domains_are_seen(stored):
    matches, _ = _find("STUDY", {}, domains=["default"])
    assert [m["StudyInstanceUID"] for m in matches] == [STUDY_A]
    assert _find("SERIES", {"SeriesInstanceUID": "1.2.3.21"}, domains=["default"])[0] == []
    assert _find("IMAGE", {}, domains=[])[0] == []


def test_series_and_image_levels_without_higher_uids(stored):
    series, _ = _find("SERIES", {"Modality": "CT"})
    assert [(s["SeriesInstanceUID"], s["StudyInstanceUID"],
             s["NumberOfSeriesRelatedInstances"]) for s in series] == [
        ("1.2.3.11", STUDY_A, 3), ("1.2.3.21", STUDY_B, 1)]
    images, _ = _find("IMAGE", {"SOPInstanceUID": "1.2.3.11.2\\1.2.3.21.1"})
    assert [(i["SeriesInstanceUID"], i["InstanceNumber"]) for i in images] == [
        ("1.2.3.11", 2), ("1.2.3.21", 1)]
    assert images[0]["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


def test_limit_offset_and_patient_level(stored):
    images, _ = _find("IMAGE", {}, limit=2, offset=1)
    assert [(i["SeriesInstanceUID"], i["InstanceNumber"]) for i in images] == [
        ("1.2.3.11", 2), ("1.2.3.11", 3)]
    patients, _ = _find("PATIENT", {"PatientID": ""})
    assert [(p["PatientID"], p["NumberOfPatientRelatedStudies"],
             p["NumberOfPatientRelatedInstances"]) for p in patients] == [("P1", 1, 4), ("P2", 1, 1)]


def test_patient_attributes_are_neither_shown_nor_matched_without_personal_info(stored):
    matches, ignored = _find("STUDY", {"PatientName": "Roe*"}, include_patient=False)
    assert ignored == ["PatientName"]
    assert len(matches) == 2 and all("PatientName" not in m and "PatientID" not in m
                                     for m in matches)


def test_unknown_keys_are_listed_as_ignored(stored):
    _matches, ignored = _find("SERIES", {"BodyPartExamined": "CHEST", "Modality": "",
                                         "NumberOfSeriesRelatedInstances": ""})
    assert ignored == ["BodyPartExamined"]


@pytest.mark.parametrize("level, keys", [
    ("STUDY", {"StudyInstanceUID": "1.2.*"}),
    ("STUDY", {"StudyInstanceUID": "not a uid"}),
    ("STUDY", {"StudyDate": "2020-01-01"}),
    ("STUDY", {"StudyDate": "20201301"}),
    ("STUDY", {"StudyDate": "20201231-20200101"}),
    ("STUDY", {"StudyDate": "-"}),
    ("SERIES", {"SeriesNumber": "two"}),
    ("STUDY", {"SOPInstanceUID": "1.2.3"}),
    ("NOWHERE", {}),
])
def test_malformed_identifiers_are_query_errors(stored, level, keys):
    with pytest.raises(query.QueryError):
        _find(level, keys)


def test_instance_files_in_order_and_only_visible(stored):
    found = [(row.series_uid, row.instance_number, os.path.isfile(path))
             for row, path in query.instance_files(["default"], study_uid=STUDY_A)]
    assert found == [("1.2.3.11", 1, True), ("1.2.3.11", 2, True), ("1.2.3.11", 3, True),
                     ("1.2.3.12", 1, True)]
    assert list(query.instance_files(["default"], sop_instance_uid="1.2.3.21.1")) == []


def test_index_instances_fills_series_stored_before_the_index(stored):
    db.session.execute(sa.delete(Instance))
    db.session.execute(sa.update(Series).values(study_date=None, accession_number=None,
                                                updated_at=Series.updated_at))
    db.session.commit()
    assert importer.index_instances() == (3, 0)
    assert db.session.scalar(sa.select(sa.func.count()).select_from(Instance)) == 5
    assert db.session.get(Series, "1.2.3.21").accession_number == "ACC2"
    assert importer.index_instances() == (0, 0)  # nothing left to do
