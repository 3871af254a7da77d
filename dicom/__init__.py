"""Everything that reads or writes DICOM."""
