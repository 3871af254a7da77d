"""A fast walk over a DICOM file's top-level header for the values the instance rules read.

pydicom builds a whole Dataset per file (~0.3 ms for a small header); an import only needs
the full data set once per *new series* (its record, API.md 3.2.1). For every other
instance the importer needs the values its rules check (``instance.RULES``: character
set, instance number, series and study UIDs, Rows, Columns, Modality, Patient's Sex...)
and the position of the pixel data (to refuse truncated files). ``scan`` walks the
elements (``elements.walk_header``) and returns the raw values of the tags the rules
declare, or None whenever anything is unusual (a transfer syntax other than
implicit/explicit little endian or explicit big endian, an unknown VR, an undefined length
outside a sequence, values beyond the bytes read...): the caller then parses the file
with pydicom exactly as before, so an odd file is never judged by this walk alone.
"""
import functools
import struct

from pydicom.uid import UID

from dicom.elements import NeedMore, Unusual, check_pixel_data, walk_header
from dicom.errors import BrokenDicomError
from dicom.instance import (check_instance, check_readable, check_vrs, dataset_vrs, raw_bytes,
                            read_checked, syntax_of, wanted_tags)

HEAD_BYTES = 64 * 1024
MAX_HEAD_BYTES = 4 * 1024 * 1024


class UndeclaredTagError(LookupError):
    """Raised when a rule reads a tag it did not declare (the scan did not keep it)."""


class Header:
    """What ``scan`` found: raw values of the wanted tags (and their explicit VRs), the
    transfer syntax, and where the pixel data element starts (relative to the start of
    the file)."""

    __slots__ = ("values", "wanted", "syntax", "little", "implicit", "pixel_offset", "vrs")

    def __init__(self, values, wanted, syntax, little, implicit, pixel_offset, vrs=None):
        self.values = values
        self.vrs = {} if vrs is None else vrs
        self.wanted = wanted
        self.syntax = syntax
        self.little = little
        self.implicit = implicit
        self.pixel_offset = pixel_offset

    def raw(self, tag):
        """The undecoded bytes of a top-level wanted element, or None."""
        if tag not in self.wanted:
            # Loud, not None: a rule reading an undeclared tag would pass on this path
            # what pydicom's path refuses.
            raise UndeclaredTagError(f"Tag {tag:08X} is read by a rule that does not "
                                     "declare it.")
        return self.values.get(tag)


def scan(fh, size):
    """Walk the header of the DICOM file at ``fh``'s position (``size`` bytes long).

    Returns a Header, or None when the file should be parsed by pydicom instead. ``fh``
    is left at an unspecified position.
    """
    wanted = wanted_tags()
    start = fh.tell()
    want = min(size, HEAD_BYTES)
    buf = fh.read(want)
    while True:
        try:
            vrs = {}
            values, syntax, little, implicit, pixel = walk_header(buf, size, wanted, vrs)
            return Header(values, wanted, syntax, little, implicit, pixel, vrs)
        except NeedMore:
            if len(buf) >= size or len(buf) >= MAX_HEAD_BYTES:
                return None
            want = min(size, MAX_HEAD_BYTES, len(buf) * 4)
            fh.seek(start)
            buf = fh.read(want)
        except (Unusual, struct.error, ValueError, UnicodeDecodeError):
            return None


@functools.lru_cache(maxsize=64)
def _uid(text):
    """pydicom's UID of a transfer syntax (validated once per distinct value)."""
    return UID(text)


def read_keys(fh, size, header=None):
    """Check one instance and return its InstanceKeys (transfer syntax included), reading only what
    that needs: the scan, or pydicom's parse (read_dataset, with its errors) whenever the
    scan leaves the file to it or its pixel data check fails. Both paths check the VRs of
    the wanted tags and the pixel data's size; pydicom's also that every top-level value
    decodes (``check_readable``). ``header``: the caller's ``scan`` of the same bytes
    (from ``fh``'s position), not scanned again.

    Raises
    ------
    NotDicomError, BrokenDicomError, InvalidInstanceError
    """
    start = fh.tell()
    if header is None:
        header = scan(fh, size)
    if header is not None:
        fh.seek(start + header.pixel_offset)
        try:
            pixels = check_pixel_data(fh, start + size, _uid(header.syntax))
        except BrokenDicomError:
            pass  # pydicom's path below gives the verdict
        else:
            keys = check_instance(header.raw, header.little, header.vrs, pixels)
            return keys._replace(transfer_syntax_uid=header.syntax)
    fh.seek(start)
    dataset, pixels = read_checked(fh, size)
    check_vrs(dataset_vrs(dataset))  # first: its message is the clearer one
    check_readable(dataset)
    syntax, little = syntax_of(dataset)
    keys = check_instance(lambda tag: raw_bytes(dataset, tag), little, pixels=pixels)
    return keys._replace(transfer_syntax_uid=syntax or None)
