"""dicom.elements: the one raw element reader, its constants and its checks."""
import io

import pydicom
import pytest
from pydicom.uid import UID

from dicom import elements
from dicom.errors import BrokenDicomError
from tests.dicom_factory import dicom_bytes


def test_split_meta_finds_the_syntax_and_the_data_set():
    data = dicom_bytes()
    meta_end, syntax = elements.split_meta(data)
    assert syntax == elements.EXPLICIT_LE
    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    first = elements.Reader(data).header(meta_end)[0]
    assert first >> 16 != elements.META_GROUP and first in dataset
    assert elements.split_meta(b"\0" * 200) == (0, None)


@pytest.mark.parametrize("name", ["head-first/head-first001.dcm", "misc/MR-MONO2-16-head.dcm",
                                  "misc/with-private-tags.dcm"])
def test_reader_walks_the_same_top_level_elements_as_pydicom(dicom_dir, name):
    data = (dicom_dir / name).read_bytes()
    meta_end, syntax = elements.split_meta(data)
    explicit = syntax != elements.IMPLICIT_LE
    reader = elements.Reader(data, explicit=explicit)
    walked = [tag for tag, _vr, _offset, _length in reader.elements(meta_end, None, explicit)]
    dataset = pydicom.dcmread(io.BytesIO(data))
    assert walked == [int(tag) for tag in dataset.keys()]


def test_reader_refuses_a_truncated_buffer():
    data = dicom_bytes()
    meta_end, _syntax = elements.split_meta(data)
    reader = elements.Reader(data[:meta_end + 5])
    with pytest.raises(elements.ElementError, match="truncated"):
        list(reader.elements(meta_end, None, True))


def test_walk_header_needs_more_bytes_and_leaves_odd_files():
    data = dicom_bytes(SeriesDescription="x" * 4000)
    with pytest.raises(elements.NeedMore):
        elements.walk_header(data[:1000], len(data), frozenset())
    with pytest.raises(elements.Unusual):
        elements.walk_header(b"\0" * 300, 300, frozenset())
    values, syntax, little, implicit, pixel = elements.walk_header(
        data, len(data), frozenset({0x00080060}))
    assert values == {0x00080060: b"CT"} and (syntax, little, implicit) == (
        elements.EXPLICIT_LE, True, False)
    assert data[pixel:pixel + 4] == b"\xe0\x7f\x10\x00"


def test_check_pixel_data_refuses_a_short_value():
    data = dicom_bytes()
    pixel = elements.walk_header(data, len(data), frozenset())[4]
    fh = io.BytesIO(data)
    fh.seek(pixel)
    elements.check_pixel_data(fh, len(data), UID(elements.EXPLICIT_LE))
    fh.seek(pixel)
    with pytest.raises(BrokenDicomError, match="no pixel data or is truncated"):
        elements.check_pixel_data(fh, len(data) - 1, UID(elements.EXPLICIT_LE))


def test_one_set_of_vrs():
    assert not elements.LONG_LENGTH_VRS & elements.SHORT_VRS
    assert elements.KNOWN_VRS == {vr.decode() for vr in elements.LONG_LENGTH_VRS | elements.SHORT_VRS}
    assert elements.is_dicm(dicom_bytes()) and not elements.is_dicm(b"DICM")


def _fragments(*items, delimiter=True):
    body = b"".join(b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item for item in items)
    return body + (elements.SEQUENCE_DELIMITER_LE if delimiter else b"")


def test_pixel_data_sums_fragments_up_to_a_bound():
    value = _fragments(b"", bytes(100), bytes(300))
    pixels = elements.PixelData(io.BytesIO(value), 0, len(value), True, None)
    assert pixels.fragments_total(10 ** 6) == len(value)  # no walk: the bytes bound the sum
    assert pixels.fragments_total(400) == 400
    assert pixels.fragments_total(150) == 400  # stopped once over the bound
    assert pixels.first_fragment(10) == bytes(10)
    broken = value.replace(b"\xfe\xff\x00\xe0", b"\xfe\xff\x00\xe1", 2)
    with pytest.raises(BrokenDicomError, match="malformed"):
        elements.PixelData(io.BytesIO(broken), 0, len(broken), True, None).fragments_total(50)


def test_walk_header_gives_the_explicit_vrs_of_wanted_tags():
    data = dicom_bytes()
    vrs = {}
    elements.walk_header(data, len(data), frozenset((0x00280010, 0x00200013)), vrs)
    assert vrs == {0x00280010: "US", 0x00200013: "IS"}
