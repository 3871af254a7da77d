"""A synthetic 512x512 int16 CT series for the benchmarks: air around an elliptic body of soft
tissue with noise, one Explicit VR Little Endian file per slice."""
import os

import numpy as np

SIZE = 512


def write_ct_series(folder, slices, series_uid, file_name, z_step=1.0, spacing=None, seed=7,
                    patient_id="BENCH"):
    """Write ``slices`` files into ``folder`` and return their paths.

    ``file_name(i)`` names slice i (0-based); ``z_step`` is the Image Position z increment
    (negative for a foot-first stack); ``spacing`` sets Spacing Between Slices when given.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    body = ((x - 256) / 200.0) ** 2 + ((y - 256) / 150.0) ** 2 <= 1
    study = generate_uid("1.2.826.0.1.3680043.10.999.")
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^CT", patient_id
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        if spacing is not None:
            ds.SpacingBetweenSlices = spacing
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.InstanceNumber, ds.SliceLocation = i + 1, float(i)
        ds.ImagePositionPatient = [0, 0, z_step * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        pixels = np.where(body, 1064, 24) + rng.normal(0, 12, (SIZE, SIZE))
        ds.PixelData = pixels.astype("<i2").tobytes()
        path = os.path.join(folder, file_name(i))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
