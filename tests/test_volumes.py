"""Volumes: decoding series into voxels, the plug-in input files (API.md 5.3), the tag dump."""
import json
import math
import os
import stat

import numpy as np
import pydicom
import pytest

import storage
from dicom import tag_dump, volumes
from tests.sample_series import store_series

MHD_HEAD_FIRST = ("ObjectType = Image\nNDims = 3\nDimSize = 320 260 10\n"
                  "ElementType = MET_USHORT\nElementSpacing = 1.1875 1.1875 8.1\n"
                  "ElementByteOrderMSB = False\nElementDataFile = 0.raw\n")


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app


def files(dicom_dir, folder):
    return sorted((dicom_dir / folder).glob("*.dcm"))


def modified(tmp_path, source, name, **changes):
    """A copy of a sample file with some attributes changed (None deletes)."""
    ds = pydicom.dcmread(source)
    for key, value in changes.items():
        if value is None:
            if key in ds:
                del ds[key]
        else:
            setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def read_raw(path, dtype):
    return np.fromfile(path, dtype=dtype)


def test_load_volume_head_first(ctx, dicom_dir):
    paths = files(dicom_dir, "head-first")
    uid = store_series(paths)
    volume, meta = volumes.load_volume(uid, list(range(1, 11)))
    expected = np.stack([pydicom.dcmread(p).pixel_array for p in paths])
    assert volume.shape == (10, 260, 320) and volume.dtype == np.uint16
    assert np.array_equal(volume, expected)
    assert meta == {"pixelFormat": "uint16", "elementType": "MET_USHORT",
                    "dimension": [320, 260, 10], "pixelSpacing": [1.1875, 1.1875],
                    "slicePitch": 8.1, "modality": "MR"}


def test_pvd_order_is_followed(ctx, dicom_dir):
    paths = files(dicom_dir, "head-first")
    uid = store_series(paths)
    volume, _ = volumes.load_volume(uid, volumes.pvd_images({"start": 9, "end": 3, "delta": -3}))
    expected = np.stack([pydicom.dcmread(paths[i]).pixel_array for i in (8, 5, 2)])
    assert np.array_equal(volume, expected)


@pytest.mark.parametrize("pvd, images", [
    ({"start": 1, "end": 3, "delta": 1}, [1, 2, 3]),
    ({"start": 10, "end": 1, "delta": -1}, list(range(10, 0, -1))),
    ({"start": 25, "end": 85, "delta": 3}, list(range(25, 86, 3))),
    ({"start": 4, "end": 4}, [4]),
])
def test_pvd_images(pvd, images):
    assert volumes.pvd_images(pvd) == images


@pytest.mark.parametrize("pvd", [{"start": 1, "end": 4, "delta": 2},
                                 {"start": 4, "end": 1, "delta": 1},
                                 {"start": 1, "end": 2, "delta": 0}])
def test_bad_pvd(pvd):
    with pytest.raises(volumes.VolumeError):
        volumes.pvd_images(pvd)


def test_plugin_input_files(ctx, dicom_dir, tmp_path):
    paths = files(dicom_dir, "head-first")
    uid = store_series(paths)
    out = tmp_path / "in"
    volumes.write_plugin_input(uid, {"start": 1, "end": 10, "delta": 1}, str(out), 0)
    assert sorted(os.listdir(out)) == ["0.json", "0.mhd", "0.raw"]
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o444
    assert (out / "0.mhd").read_bytes() == MHD_HEAD_FIRST.encode()
    raw = read_raw(out / "0.raw", "<u2")
    assert raw.size == 320 * 260 * 10
    assert np.array_equal(raw.reshape(10, 260, 320),
                          np.stack([pydicom.dcmread(p).pixel_array for p in paths]))
    text = (out / "0.json").read_text()
    dump = json.loads(text)
    assert list(dump) == ["common", "unique"] and len(dump["unique"]) == 10
    assert text.startswith('{\n  "common": {\n    "0002,0000": ')
    assert dump["common"]["0008,0060"] == "MR"
    assert dump["common"]["0028,0010"] == 260  # US read as a number (explicit VR)
    numbers = [u["0020,0013"] for u in dump["unique"]]
    assert numbers == [str(n) for n in range(1, 11)]
    assert "0020,0013" not in dump["common"]
    for part in [dump["common"], *dump["unique"]]:
        assert not {"0010,0010", "0010,0020", "0010,0030", "0008,0080"} & set(part)
    keys = list(dump["common"])
    assert keys == sorted(keys)  # file order of a well-formed file


def test_single_slice_dump_has_one_empty_unique(ctx, dicom_dir, tmp_path):
    uid = store_series([dicom_dir / "misc" / "MR-phantom-LE.dcm"])
    volumes.write_plugin_input(uid, {"start": 1, "end": 1, "delta": 1}, str(tmp_path), 3)
    dump = json.loads((tmp_path / "3.json").read_text())
    assert dump["unique"] == [{}]
    assert "ElementSpacing = 1.5625 1.5625 10\n" in (tmp_path / "3.mhd").read_text()


def test_private_tags_are_omitted(ctx, dicom_dir, tmp_path):
    source = dicom_dir / "misc" / "with-private-tags.dcm"
    assert any(e.tag.is_private for e in pydicom.dcmread(source))
    uid = store_series([source])
    volumes.write_plugin_input(uid, {"start": 1, "end": 1, "delta": 1}, str(tmp_path), 0)
    dump = json.loads((tmp_path / "0.json").read_text())["common"]
    assert dump and not [k for k in dump if int(k[3], 16) % 2]
    assert dump["0040,0275"] == [{"0040,1001": ""}]  # nested sequence, text VR kept as ""
    assert dump["0018,9324"] == []  # empty binary numeric value


def test_implicit_vr_uses_the_string_rule(ctx, dicom_dir, tmp_path):
    uid = store_series([dicom_dir / "misc" / "MR-MONO2-16-head.dcm"])
    volumes.write_plugin_input(uid, {"start": 1, "end": 1, "delta": 1}, str(tmp_path), 0)
    dump = json.loads((tmp_path / "0.json").read_text())["common"]
    assert dump["0028,0100"] == "\x10"  # 16 as bytes 10 00, up to the first NUL
    assert dump["0028,0010"] == ""  # 256 = bytes 00 01
    assert dump["0002,0000"] == 186  # the meta group is always explicit VR
    assert dump["0020,0032"] == "-110.000000\\ -109.800003\\-47.500000"


def test_personal_tags_removed_in_sequences(tmp_path, dicom_dir):
    ds = pydicom.dcmread(dicom_dir / "misc" / "MR-phantom-LE.dcm")
    item = pydicom.Dataset()
    item.PatientName = "Secret^Name"
    item.InstitutionName = "Hospital"
    item.CodeValue = "X1"
    ds.ReferencedPatientSequence = [item]
    ds.save_as(tmp_path / "seq.dcm")
    dump = tag_dump.dump_file((tmp_path / "seq.dcm").read_bytes())
    assert dump["0008,1120"] == [{"0008,0100": "X1"}]
    assert "Secret" not in json.dumps(dump) and "Hospital" not in json.dumps(dump)


def test_lossless_mr_equals_uncompressed_twin(ctx, dicom_dir, tmp_path):
    raw = {}
    for name in ("MR-phantom-LE.dcm", "MR-phantom-lossless.dcm"):
        uid = store_series([dicom_dir / "misc" / name], series_uid=f"1.2.3.{len(raw) + 1}")
        out = tmp_path / name
        volumes.write_plugin_input(uid, {"start": 1, "end": 1, "delta": 1}, str(out), 0)
        raw[name] = (out / "0.raw").read_bytes()
        assert (out / "0.mhd").read_text().splitlines()[3] == "ElementType = MET_SHORT"
    assert raw["MR-phantom-LE.dcm"] == raw["MR-phantom-lossless.dcm"]
    assert len(raw["MR-phantom-LE.dcm"]) == 256 * 256 * 2


def test_lossless_ct_equals_uncompressed_twin(ctx, dicom_dir, tmp_path):
    source = dicom_dir / "misc" / "CT-phantom-lossless.dcm"
    twin = pydicom.dcmread(source)
    twin.decompress()
    twin.save_as(tmp_path / "twin.dcm")
    lossless = store_series([source], series_uid="1.2.3.1")
    plain = store_series([tmp_path / "twin.dcm"], series_uid="1.2.3.2")
    a, meta = volumes.load_volume(lossless, [1])
    b, _ = volumes.load_volume(plain, [1])
    assert meta["pixelFormat"] == "int16" and np.array_equal(a, b)
    # rescale intercept -1024 applied: air is about -1000 HU
    stored = pydicom.dcmread(tmp_path / "twin.dcm").pixel_array
    assert np.array_equal(a[0], stored.astype(np.int32) - 1024)


def test_ct_rescaled_to_int16_hu(ctx, dicom_dir):
    source = dicom_dir / "misc" / "with-private-tags.dcm"  # unsigned 12-bit, intercept -1024
    uid = store_series([source])
    volume, meta = volumes.load_volume(uid, [1])
    stored = pydicom.dcmread(source).pixel_array
    assert stored.dtype == np.uint16
    assert meta["pixelFormat"] == "int16" and volume.dtype == np.int16
    assert np.array_equal(volume[0], stored.astype(np.int32) - 1024)


def test_ct_rescale_slope_truncates(ctx, dicom_dir, tmp_path):
    path = modified(tmp_path, dicom_dir / "misc" / "CT-MONO2-16-brain.dcm", "ct.dcm",
                    RescaleSlope="0.5", RescaleIntercept="-10.5")
    uid = store_series([path])
    volume, _ = volumes.load_volume(uid, [1])
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert np.array_equal(volume[0], np.trunc(stored * 0.5 - 10.5).astype(np.int16))


def test_monochrome1_is_inverted(ctx, dicom_dir, tmp_path):
    source = dicom_dir / "head-first" / "head-first001.dcm"  # unsigned, 12 bits stored
    path = modified(tmp_path, source, "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    uid = store_series([path])
    volume, _ = volumes.load_volume(uid, [1])
    stored = pydicom.dcmread(source).pixel_array.astype(np.int32)
    assert np.array_equal(volume[0], (4095 - stored).astype(np.uint16))


def test_monochrome1_signed_is_negated(ctx, dicom_dir, tmp_path):
    source = dicom_dir / "misc" / "MR-phantom-LE.dcm"  # signed 16 bits
    path = modified(tmp_path, source, "m1s.dcm", PhotometricInterpretation="MONOCHROME1")
    uid = store_series([path])
    volume, _ = volumes.load_volume(uid, [1])
    stored = pydicom.dcmread(source).pixel_array.astype(np.int32)
    assert np.array_equal(volume[0], (-stored - 1).astype(np.int16))


def test_rgb_becomes_rgba8(ctx, dicom_dir, tmp_path):
    source = dicom_dir / "misc" / "MR-RGB-Head-MRA.dcm"
    uid = store_series([source])
    volume, meta = volumes.load_volume(uid, [1])
    rgb = pydicom.dcmread(source).pixel_array
    assert meta["pixelFormat"] == "rgba8" and volume.shape == (1, 512, 512, 4)
    assert np.array_equal(volume[0, ..., :3], rgb) and (volume[..., 3] == 255).all()
    volumes.write_plugin_input(uid, {"start": 1, "end": 1, "delta": 1}, str(tmp_path), 0)
    header = (tmp_path / "0.mhd").read_text()
    assert "ElementNumberOfChannels = 4\nElementType = MET_UCHAR\n" in header
    assert "undefined" not in header
    assert (tmp_path / "0.raw").stat().st_size == 512 * 512 * 4


def test_missing_slice_location_gives_pitch_1(ctx, dicom_dir, tmp_path):
    paths = [modified(tmp_path, p, p.name, SpacingBetweenSlices=None, SliceLocation=None)
             for p in files(dicom_dir, "head-first")[:3]]
    uid = store_series(paths)
    volumes.write_plugin_input(uid, {"start": 1, "end": 3, "delta": 1}, str(tmp_path / "o"), 0)
    assert "ElementSpacing = 1.1875 1.1875 1\n" in (tmp_path / "o" / "0.mhd").read_text()


def test_pitch_from_slice_location(ctx, dicom_dir, tmp_path):
    paths = [modified(tmp_path, p, p.name, SpacingBetweenSlices=None)
             for p in files(dicom_dir, "foot-first")[:3]]
    uid = store_series(paths)
    with volumes.VolumeReader(uid, [1, 2, 3]) as reader:
        assert reader.plugin_pitch() == abs(-335.53414535522 - -327.4341468811)


def test_negative_spacing_is_written_as_is(ctx, dicom_dir, tmp_path):
    paths = [modified(tmp_path, p, p.name, SpacingBetweenSlices="-2.5")
             for p in files(dicom_dir, "head-first")[:2]]
    uid = store_series(paths)
    volumes.write_plugin_input(uid, {"start": 1, "end": 2, "delta": 1}, str(tmp_path / "o"), 0)
    assert "ElementSpacing = 1.1875 1.1875 -2.5\n" in (tmp_path / "o" / "0.mhd").read_text()
    with volumes.VolumeReader(uid, [1, 2]) as reader:
        assert reader.export_pitch() == 2.5


def test_zero_spacing_fails(ctx, dicom_dir, tmp_path):
    path = modified(tmp_path, dicom_dir / "head-first" / "head-first001.dcm", "z.dcm",
                    SpacingBetweenSlices="0")
    uid = store_series([path])
    with pytest.raises(volumes.VolumeError, match="Slice pitch could not be determined"):
        volumes.load_volume(uid, [1])


def test_missing_file_fails_and_leaves_nothing(ctx, dicom_dir, tmp_path):
    uid = store_series(files(dicom_dir, "head-first"))
    os.unlink(storage.instance_path(uid, 7))
    out = tmp_path / "in"
    with pytest.raises(volumes.ImageMissingError, match="Image #7 of series .* is missing"):
        volumes.write_plugin_input(uid, {"start": 1, "end": 10, "delta": 1}, str(out), 0)
    assert os.listdir(out) == []


def test_unsupported_pixel_format(ctx, dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / "misc" / "MR-phantom-LE.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "p.dcm")
    uid = store_series([tmp_path / "p.dcm"])
    with pytest.raises(volumes.UnsupportedImageError, match="Unsupported pixel format"):
        volumes.load_volume(uid, [1])


def test_not_dicom(ctx, dicom_dir, tmp_path):
    uid = store_series([dicom_dir / "misc" / "MR-phantom-LE.dcm"])
    with open(storage.instance_path(uid, 1), "wb") as fh:
        fh.write(b"not a dicom file at all")
    with pytest.raises(volumes.VolumeError):
        volumes.load_volume(uid, [1])


def test_size_mismatch_fails(ctx, dicom_dir):
    uid = store_series([dicom_dir / "misc" / "MR-phantom-LE.dcm",
                        dicom_dir / "misc" / "CT-MONO2-16-brain.dcm"])
    with pytest.raises(volumes.VolumeError, match="differs in size"):
        volumes.load_volume(uid, [1, 2])


@pytest.mark.parametrize("value, text", [
    (1.0, "1"), (8.1, "8.1"), (-2.5, "-2.5"), (0.1, "0.1"), (1e21, "1e+21"), (1e20, "100000000000000000000"),
    (1e-7, "1e-7"), (0.000001, "0.000001"), (123456.789, "123456.789"), (math.nan, "null"),
    (5, "5"), (0.0, "0"), (1.5e-10, "1.5e-10"),
])
def test_js_number(value, text):
    assert tag_dump.js_number(value) == text


def test_to_json_matches_json_stringify_layout():
    value = {"a": [], "b": {}, "c": [1, {"d": "é\n"}], "e": 0.5}
    assert tag_dump.to_json(value) == (
        '{\n  "a": [],\n  "b": {},\n  "c": [\n    1,\n    {\n      "d": "é\\n"\n    }\n  ],'
        '\n  "e": 0.5\n}')


def test_common_and_unique():
    result = tag_dump.common_and_unique([{"a": 1, "b": [1, 2], "c": "x"},
                                         {"a": 1, "b": [1, 2], "c": "y", "d": 4}])
    assert result == {"common": {"a": 1, "b": [1, 2]},
                      "unique": [{"c": "x"}, {"c": "y", "d": 4}]}


def test_ct_hounsfield_values_are_clipped_to_int16(ctx, dicom_dir, tmp_path):
    path = modified(tmp_path, dicom_dir / "misc" / "CT-MONO2-16-brain.dcm", "clip.dcm",
                    RescaleIntercept="-32000")
    uid = store_series([path])
    volume, _ = volumes.load_volume(uid, [1])
    stored = pydicom.dcmread(path).pixel_array.astype(np.int64)
    assert stored.min() - 32000 < -32768  # the case is exercised
    assert np.array_equal(volume[0], np.clip(stored - 32000, -32768, 32767))


def test_signed_pixels_with_fewer_bits_stored_are_sign_extended(ctx, dicom_dir, tmp_path):
    ds = pydicom.dcmread(dicom_dir / "misc" / "MR-phantom-LE.dcm")  # signed 16 bits
    values = np.array([[-3, 5], [-2048, 2047]], dtype=np.int16)
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = 2, 2, 12, 11
    ds.PixelData = (values.astype(np.uint16) & 0x0FFF).astype("<u2").tobytes()  # no sign bits
    ds.save_as(tmp_path / "s12.dcm")
    uid = store_series([tmp_path / "s12.dcm"])
    volume, _ = volumes.load_volume(uid, [1])
    assert np.array_equal(volume[0], values)


RAW_HEADER_VARIANTS = {
    "as stored": {},
    "MONOCHROME1": {"PhotometricInterpretation": "MONOCHROME1"},
    "CT with slope": {"Modality": "CT", "RescaleSlope": "2", "RescaleIntercept": "-1000"},
    "one frame": {"NumberOfFrames": "1"},
    "12 bits stored": {"BitsStored": 12, "HighBit": 11},
    "no slice location": {"SliceLocation": None},
}


@pytest.mark.parametrize("variant", sorted(RAW_HEADER_VARIANTS))
@pytest.mark.parametrize("sample", ["head-first/head-first001.dcm", "misc/MR-phantom-LE.dcm",
                                    "misc/CT-MONO2-16-brain.dcm", "misc/MR-MONO2-16-head.dcm"])
def test_raw_header_decodes_as_pydicom(dicom_dir, tmp_path, sample, variant):
    """Native files are decoded from a raw walk of their header; a twin without the
    Part 10 preamble goes through pydicom and must give the very same slice."""
    path = modified(tmp_path, dicom_dir / sample, "a.dcm", **RAW_HEADER_VARIANTS[variant])
    data = path.read_bytes()
    ds = pydicom.dcmread(path)
    ds.preamble = None
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=False)
    twin = (tmp_path / "b.dcm").read_bytes()
    assert volumes._RawHeader.parse(data) is not None
    assert volumes._RawHeader.parse(twin) is None
    fast, slow = volumes.decode_slice(1, data), volumes.decode_slice(1, twin)
    assert fast.pixels.dtype == slow.pixels.dtype
    assert np.array_equal(fast.pixels, slow.pixels)
    for field in ("pixel_format", "columns", "rows", "modality", "pixel_spacing",
                  "spacing_between_slices"):
        assert getattr(fast, field) == getattr(slow, field), field
    assert fast.slice_location == slow.slice_location or \
        math.isnan(fast.slice_location) and math.isnan(slow.slice_location)


@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", "<i2"])
@pytest.mark.parametrize("intercept", [0, -1024, 1024, -32767, 32767, -20000, 20000])
def test_hounsfield_rescale_matches_the_exact_formula(dtype, intercept):
    """The integer fast paths (which skip the min or max pass a stored type cannot
    exceed) give the truncated, clipped value of stored * slope + intercept."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    edges = np.array([info.min, info.min + 1, 0, info.max - 1, info.max], dtype=dtype)
    for pixels in (edges.reshape(1, 5),
                   rng.integers(info.min, info.max, (8, 9), endpoint=True).astype(dtype),
                   rng.integers(0, min(info.max, 2000), (8, 9)).astype(dtype)):
        expected = np.clip(np.trunc(pixels.astype(np.float64) + intercept), -32768, 32767)
        hu = volumes._to_hounsfield(pixels, 1.0, float(intercept))
        assert hu.dtype == np.dtype("<i2")
        assert np.array_equal(hu, expected.astype(np.int64)), (pixels, hu)
