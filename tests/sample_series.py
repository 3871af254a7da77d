"""Series made of the shared sample DICOM files, stored the way the importer stores them.

Used by the volume, export and task tests (no second importer: files are copied to
``storage.instance_path`` and the row comes from ``factories.make_series``).
"""
import shutil

import pydicom

import storage
from models import db
from tests.factories import make_series


def store_series(dicom_files, series_uid=None, domain="default", numbers=None):
    """Copy files in as instances 1..n (or ``numbers``) of one series; return its UID."""
    dicom_files = [str(f) for f in dicom_files]
    first = pydicom.dcmread(dicom_files[0], stop_before_pixels=True)
    series_uid = series_uid or str(first.SeriesInstanceUID)
    numbers = list(numbers or range(1, len(dicom_files) + 1))
    for number, path in zip(numbers, dicom_files):
        target = storage.instance_path(series_uid, number)
        storage.series_dir(series_uid)
        import os
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    images = ",".join(str(n) for n in numbers) if numbers != list(
        range(numbers[0], numbers[-1] + 1)) else (
        f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0]))
    make_series(series_uid, domain=domain, images=images,
                modality=str(first.get("Modality", "OT")),
                width=int(first.Columns), height=int(first.Rows))
    db.session.commit()
    return series_uid
