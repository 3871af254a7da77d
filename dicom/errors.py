"""The errors of reading and importing DICOM; each message is shown to users."""


class DicomImportError(Exception):
    """Raised when an instance, an archive or a batch cannot be imported (user-facing)."""
    status = 400


class NotDicomError(DicomImportError):
    """Raised when a file does not look like DICOM (no ``DICM`` at byte 128)."""


class BrokenDicomError(DicomImportError):
    """Raised when a DICOM file cannot be parsed or is truncated."""


class InvalidInstanceError(DicomImportError):
    """Raised when a parsed instance lacks what a series record needs (3.2.1)."""


class DomainConflictError(DicomImportError):
    """Raised when instances of an existing series are imported into another domain."""
    status = 409


class ArchiveError(DicomImportError):
    """Raised when an archive cannot be read."""


class ArchiveLimitError(ArchiveError):
    """Raised when an archive exceeds the configured entry count or uncompressed size."""


class ImportFailed(DicomImportError):
    """Raised by an Importer with CIRCUS's "Error while processing file #f, entity #e"."""
