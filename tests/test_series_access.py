"""series_access: partial volume descriptors, look-up and orientation."""
import os
import shutil

import pytest

import series_access as sa_
import storage
from errors import ApiError
from models import db
from tests.dicom_factory import write_dicom
from tests.factories import make_series


# --- PVDs --------------------------------------------------------------------------------

@pytest.mark.parametrize("pvd, images", [
    ({"start": 1, "end": 3, "delta": 1}, [1, 2, 3]),
    ({"start": 10, "end": 8, "delta": -1}, [10, 9, 8]),
    ({"start": 25, "end": 85, "delta": 3}, list(range(25, 86, 3))),
    ({"start": 4, "end": 4, "delta": 1}, [4]),
    ({"start": 4, "end": 4, "delta": 2}, [4]),
])
def test_pvd_images(pvd, images):
    assert sa_.pvd_images(pvd) == images


@pytest.mark.parametrize("pvd", [
    {"start": 0, "end": 3, "delta": 1}, {"start": 1, "end": 0, "delta": -1},
    {"start": 1, "end": 3, "delta": 0}, {"start": 3, "end": 1, "delta": 1},
    {"start": 1, "end": 3, "delta": -1}, {"start": 1, "end": 4, "delta": 2},
    {"start": 2, "end": 2, "delta": -1}, {"start": 1, "end": 3}, {"start": 1.5, "end": 3, "delta": 1},
    {"start": True, "end": 3, "delta": 1}, {"start": 1, "end": 3, "delta": 1, "x": 1},
    "auto", None, [1, 2, 1],
])
def test_validate_pvd_rejects(pvd):
    with pytest.raises(ApiError) as info:
        sa_.validate_pvd(pvd)
    assert info.value.status == 400
    assert info.value.message.startswith("Invalid partial volume descriptor: ")


def test_validate_pvd_message_quotes_compact_json():
    with pytest.raises(ApiError) as info:
        sa_.validate_pvd({"start": 3, "end": 1, "delta": 1})
    assert info.value.message == 'Invalid partial volume descriptor: {"start":3,"end":1,"delta":1}'


def test_check_pvd_range(app):
    with app.app_context():
        series = make_series("1.2.3.9", images="1-5,8")
        sa_.check_pvd_range(series, {"start": 5, "end": 1, "delta": -1})
        sa_.check_pvd_range(series, {"start": 2, "end": 8, "delta": 3})
        for pvd in ({"start": 1, "end": 6, "delta": 1}, {"start": 8, "end": 9, "delta": 1}):
            with pytest.raises(ApiError) as info:
                sa_.check_pvd_range(series, pvd)
            assert (info.value.status, info.value.message) == (400, "Specified range is invalid.")


# --- look-up and orientation ------------------------------------------------------------

def test_get_series(app):
    with app.app_context():
        make_series("1.2.3.10")
        assert sa_.get_series("1.2.3.10").series_uid == "1.2.3.10"
        with pytest.raises(ApiError) as info:
            sa_.get_series("1.2.3.11")
        assert (info.value.status, info.value.message) == (404, "The requested series was not found.")


def _store_shared(folder, series_uid, count=10):
    """Copy the shared sample series into storage as instances 1..count."""
    for n in range(1, count + 1):
        path = storage.instance_path(series_uid, n)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(folder / f"{folder.name}{n:03d}.dcm", path)


@pytest.mark.parametrize("folder, expected, delta", [("head-first", "head-first", 1),
                                                     ("foot-first", "foot-first", -1)])
def test_orientation_and_auto_of_shared_samples(app, dicom_dir, folder, expected, delta):
    with app.app_context():
        uid = "1.2.3.20"
        _store_shared(dicom_dir / folder, uid)
        series = make_series(uid, images="1-10")
        assert sa_.orientation(series) == expected
        # quirk 32 fixed: start > end answers for the ascending order, not the inverse
        assert sa_.orientation(series, 10, 1) == expected
        assert sa_.orientation(series, 3, 7) == expected
        pvd = sa_.auto_pvd(series)
        assert pvd == ({"start": 1, "end": 10, "delta": 1} if delta == 1
                       else {"start": 10, "end": 1, "delta": -1})
        db.session.commit()
        assert sa_.resolve_pvd(uid, "auto") == pvd


def test_orientation_uses_first_contiguous_run_for_auto(app, dicom_dir):
    with app.app_context():
        uid = "1.2.3.21"
        _store_shared(dicom_dir / "foot-first", uid, count=4)
        series = make_series(uid, images="1-3,7")  # 7 has no file: auto never reads it
        assert sa_.auto_pvd(series) == {"start": 3, "end": 1, "delta": -1}


def test_orientation_zero_position_is_a_real_value(app):
    """Quirk 32: z = 0 was treated as missing (500); it is an ordinary position."""
    with app.app_context():
        uid = "1.2.3.22"
        for n, z in ((1, 0.0), (2, -5.0)):
            path = storage.instance_path(uid, n)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_dicom(path, series_uid=uid, instance=n, z=z)
        series = make_series(uid, images="1-2")
        assert sa_.orientation(series) == "head-first"
        write_dicom(storage.instance_path(uid, 1), series_uid=uid, instance=1, z=-10.0)
        assert sa_.orientation(series) == "foot-first"


def test_orientation_errors(app):
    with app.app_context():
        uid = "1.2.3.23"
        series = make_series(uid, images="1-2")
        with pytest.raises(sa_.OrientationError) as info:
            sa_.orientation(series)
        assert (info.value.status, info.value.message) == (500, "no image")
        for n in (1, 2):
            path = storage.instance_path(uid, n)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_dicom(path, series_uid=uid, instance=n, ImagePositionPatient=None)
        with pytest.raises(sa_.OrientationError) as info:
            sa_.orientation(series)
        assert info.value.message == "invalid image"
        db.session.commit()
        with pytest.raises(ApiError) as info:
            sa_.resolve_pvd(uid, "auto")
        assert (info.value.status, info.value.message) == (500, "Internal server error.")


def test_single_image_is_head_first_without_files(app):
    with app.app_context():
        assert sa_.orientation(make_series("1.2.3.24", images="1")) == "head-first"


def test_resolve_pvd(app):
    with app.app_context():
        pvd = {"start": 1, "end": 2, "delta": 1}
        assert sa_.resolve_pvd("1.2.3.25", pvd) is pvd
        with pytest.raises(ApiError) as info:
            sa_.resolve_pvd("1.2.3.25", "auto")
        assert info.value.status == 404
