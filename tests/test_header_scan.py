"""header_scan: the fast header walk agrees with pydicom, and leaves odd files to it."""
import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom import errors, header_scan, instance
from dicom.batch import ImportBatch
from models import Series, db
from tests.dicom_factory import dicom_bytes, make_dataset

SAMPLES = ["head-first/head-first001.dcm", "foot-first/foot-first010.dcm",
           "misc/CT-MONO2-16-brain.dcm", "misc/CT-phantom-lossless.dcm",
           "misc/MR-MONO2-16-head.dcm", "misc/MR-RGB-Head-MRA.dcm", "misc/MR-phantom-LE.dcm",
           "misc/MR-phantom-lossless.dcm", "misc/with-private-tags.dcm"]


def _saved(ds, **kwargs):
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **kwargs)
    return buffer.getvalue()


def _implicit(**tags):
    ds = make_dataset(**tags)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    return _saved(ds, implicit_vr=True, little_endian=True)


def _big_endian(**tags):
    ds = make_dataset(PixelRepresentation=0, **tags)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
    ds.PixelData = bytes(32)
    return _saved(ds, implicit_vr=False, little_endian=False)


def _with_sequences(**tags):
    """Nested sequences of undefined length with items of undefined and defined length, one
    item holding pixel data."""
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.99"
    inner.Rows = 999  # inside an item: not the instance's Rows
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.PixelRepresentation = 1, 1, 16, 0
    icon.PixelData = b"\x00\x00"
    outer = Dataset()
    outer.ReferencedImageSequence = Sequence([inner, inner])
    ds = make_dataset(**tags)
    ds.ReferencedStudySequence = Sequence([outer])
    ds.IconImageSequence = Sequence([icon])
    for sequence in (ds["ReferencedStudySequence"], outer["ReferencedImageSequence"],
                     ds["IconImageSequence"]):
        sequence.is_undefined_length = True
    outer.is_undefined_length_sequence_item = True
    icon.is_undefined_length_sequence_item = True
    return ds


def _pydicom_view(data):
    """What pydicom reads: the raw WANTED values and where it stops before the pixels."""
    fh = io.BytesIO(data)
    dataset = pydicom.dcmread(fh, stop_before_pixels=True)
    return dataset, fh.tell()


def _assert_agrees(data):
    header = header_scan.scan(io.BytesIO(data), len(data))
    assert header is not None, "the walk left a common file to pydicom"
    dataset, stop = _pydicom_view(data)
    assert header.pixel_offset == stop
    little = instance.syntax_of(dataset)[1]
    assert header.little == little
    for tag in instance.wanted_tags():
        assert instance._ascii(header.raw(tag)) == instance._ascii(instance.raw_bytes(dataset, tag)), hex(tag)
    assert instance.check_instance(header.raw, little) == instance.check_instance(
        lambda tag: instance.raw_bytes(dataset, tag), little)
    assert header_scan.read_keys(io.BytesIO(data), len(data)) == instance.check_instance(
        header.raw, little)._replace(transfer_syntax_uid=header.syntax)


@pytest.mark.parametrize("name", SAMPLES)
def test_walk_agrees_with_pydicom_on_samples(dicom_dir, name):
    _assert_agrees((dicom_dir / name).read_bytes())


@pytest.mark.parametrize("maker", [dicom_bytes, _implicit, _big_endian])
def test_walk_agrees_with_pydicom_on_each_encoding(maker):
    _assert_agrees(maker(instance=7, series_uid="1.2.3.77"))


@pytest.mark.parametrize("encoding", [{}, {"implicit_vr": True, "little_endian": True}])
def test_walk_skips_nested_sequences(encoding):
    ds = _with_sequences(instance=8)
    if encoding:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    data = _saved(ds, **encoding)
    # Sequence and item delimiters: undefined lengths were written.
    assert b"\xfe\xff\xdd\xe0" in data and b"\xfe\xff\x0d\xe0" in data
    _assert_agrees(data)
    header = header_scan.scan(io.BytesIO(data), len(data))
    assert int.from_bytes(header.raw(0x00280010), "little") == 4


def test_walk_reads_more_than_its_first_chunk(monkeypatch):
    data = dicom_bytes(instance=9, ImageComments="x" * 3000)
    monkeypatch.setattr(header_scan, "HEAD_BYTES", 512)
    _assert_agrees(data)


def _deflated():
    ds = make_dataset(instance=6)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    return _saved(ds, implicit_vr=False, little_endian=True)


def _no_pixels():
    ds = make_dataset()
    del ds.PixelData
    return _saved(ds)


def _unknown_vr():
    data = bytearray(dicom_bytes())
    at = data.index(b"LO", 300)  # a VR of the data set
    data[at:at + 2] = b"ZZ"
    return bytes(data)


@pytest.mark.parametrize("data", [
    b"hello" * 100, dicom_bytes()[:200], dicom_bytes()[:600], _deflated(), _no_pixels(),
    _unknown_vr()], ids=["not-dicom", "cut-in-meta", "cut-in-header", "deflated",
                         "no-pixels", "unknown-vr"])
def test_odd_files_are_left_to_pydicom(data):
    assert header_scan.scan(io.BytesIO(data), len(data)) is None


@pytest.mark.parametrize("cut", [200, 600, -10])
def test_truncated_file_is_refused_with_pydicoms_verdict(cut):
    data = dicom_bytes(rows=16, columns=16)[:cut]
    with pytest.raises(errors.BrokenDicomError, match="no pixel data or is truncated"):
        header_scan.read_keys(io.BytesIO(data), len(data))


def test_keys_of_a_deflated_file_come_from_pydicom():
    data = _deflated()
    keys = header_scan.read_keys(io.BytesIO(data), len(data))
    assert keys[:2] == (6, "1.2.3.4.5")
    assert keys.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"


@pytest.mark.parametrize("tags, message", [
    ({"InstanceNumber": None}, "Instance number not set"),
    ({"SeriesInstanceUID": "1.2.abc"}, "Series UID of this DICOM file is invalid."),
    ({"StudyInstanceUID": None}, "Study UID of this DICOM file is invalid."),
    ({"Columns": None}, "Rows or Columns of this DICOM file is not set."),
    ({"Modality": None}, "Modality of this DICOM file is not set."),
    ({"PatientSex": "X"}, "Patient's Sex must be F, M or O"),
    ({"SpecificCharacterSet": "ISO_IR 999"}, "Could not find a encoding ISO_IR 999"),
])
def test_every_instance_is_checked_on_the_fast_path(tags, message):
    data = dicom_bytes(**tags)
    assert header_scan.scan(io.BytesIO(data), len(data)) is not None
    with pytest.raises(errors.InvalidInstanceError, match=message.replace("(", r"\(")):
        header_scan.read_keys(io.BytesIO(data), len(data))


def test_new_series_record_comes_from_its_first_staged_instance(app):
    with app.app_context():
        with ImportBatch("default") as batch:
            record = batch.add_bytes(dicom_bytes(instance=3, SeriesDescription="first"))
            batch.add_bytes(dicom_bytes(instance=1, SeriesDescription="second"))
            assert record.series["series_description"] == "first"  # read on demand
            batch.commit()
        with ImportBatch("default") as batch:
            batch.add_bytes(dicom_bytes(instance=2, SeriesDescription="third"))
            batch.commit()
        series = db.session.execute(db.select(Series)).scalar_one()
        assert (series.series_description, series.images) == ("first", "1-3")


# --- the wanted tags come from the rules ----------------------------------------------------

@pytest.mark.parametrize("name", SAMPLES)
def test_every_tag_a_rule_reads_is_wanted_by_the_scan(dicom_dir, name):
    """Each rule reads only tags it declares, and the scan keeps every declared tag."""
    data = (dicom_dir / name).read_bytes()
    dataset, _stop = _pydicom_view(data)
    little = instance.syntax_of(dataset)[1]
    wanted = instance.wanted_tags()
    for rule in instance.RULES:
        read = []
        rule.check(lambda tag: read.append(tag) or instance.raw_bytes(dataset, tag), little)
        assert set(read) <= set(rule.tags) <= wanted, rule.name
    header = header_scan.scan(io.BytesIO(data), len(data))
    if header is not None:
        assert header.wanted == wanted


@pytest.fixture
def station_rule():
    """A rule declared here, as a newcomer would add one to instance.py."""
    @instance.rule("station", 0x00081010)
    def _station(raw, _little):
        if instance._ascii(raw(0x00081010)) == "FORBIDDEN":
            raise errors.InvalidInstanceError("This station is not accepted.")
    yield
    instance.remove_rule("station")


def test_a_declared_rule_is_wanted_and_checked_on_the_fast_path(station_rule):
    assert 0x00081010 in instance.wanted_tags()
    data = dicom_bytes(StationName="FORBIDDEN")
    header = header_scan.scan(io.BytesIO(data), len(data))
    assert header is not None and header.raw(0x00081010) == b"FORBIDDEN "
    with pytest.raises(errors.InvalidInstanceError, match="This station is not accepted."):
        header_scan.read_keys(io.BytesIO(data), len(data))
    ok = dicom_bytes(StationName="CT01")
    assert header_scan.read_keys(io.BytesIO(ok), len(ok))[:2] == (1, "1.2.3.4.5")


def test_a_withdrawn_rule_is_no_longer_wanted():
    before = instance.wanted_tags()
    instance.rule("station", 0x00081010)(lambda raw, little: None)
    try:
        assert instance.wanted_tags() == before | {0x00081010}
    finally:
        instance.remove_rule("station")
    assert instance.wanted_tags() == before


def test_a_rule_reading_an_undeclared_tag_fails_loudly_on_the_fast_path():
    data = dicom_bytes()
    header = header_scan.scan(io.BytesIO(data), len(data))
    with pytest.raises(header_scan.UndeclaredTagError):
        header.raw(0x00081010)  # Station Name: no rule declares it
