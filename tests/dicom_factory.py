"""Small synthetic DICOM instances for tests (real files written by pydicom)."""
import io
import warnings

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_OMIT = object()


def make_dataset(series_uid="1.2.3.4.5", instance=1, z=0.0, study_uid="1.2.3.4",
                 modality="CT", rows=4, columns=4, **tags):
    """A small CT instance; ``tags`` set (value) or remove (None) any keyword."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "050Y"
    ds.StudyDate = "20200102"
    ds.StudyTime = "030405"
    ds.SeriesDate = "20200102"
    ds.SeriesTime = "030405.123456"
    ds.Modality = modality
    ds.Manufacturer = "ACME"
    ds.SeriesDescription = "synthetic"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelSpacing = [0.5, 0.6]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.arange(rows * columns, dtype="<i2").tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tests set invalid values on purpose
        for keyword, value in tags.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return ds


def dicom_bytes(**kwargs):
    """A synthetic instance as the bytes of a Part 10 file."""
    buffer = io.BytesIO()
    make_dataset(**kwargs).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(path, **kwargs):
    """Write a synthetic instance to ``path``; return the path."""
    with open(path, "wb") as fh:
        fh.write(dicom_bytes(**kwargs))
    return path
