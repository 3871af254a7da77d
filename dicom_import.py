"""DICOM import: header parsing, the series record, archives, and the import of a batch."""
