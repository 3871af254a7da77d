"""Entries of uploaded zip and tar.gz archives, read as untrusted input.

Entries with ``..``, absolute names or links are skipped, encrypted zip entries too, and
an archive's uncompressed size and entry count are bounded (``Limits``). Each entry is held
to the per-file upload limit while it is read (``Bounded``): the size an archive's headers
declare is a claim, never trusted. The export archive *writer* is the root ``archives.py``.
"""
import io
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass

from flask import current_app

from dicom.errors import ArchiveError, ArchiveLimitError


def is_zip(head):
    """Whether the first bytes of a file are those of a zip archive."""
    return head[:4] in (b"PK\x03\x04", b"PK\x07\x08")


def is_targz(head):
    """Whether the first bytes of a file are those of gzip data (a tar.gz, we assume)."""
    return head[:2] == b"\x1f\x8b"


@dataclass
class Limits:
    """Bounds of one archive: total uncompressed bytes, number of entries, bytes of one
    entry (the per-file upload limit: an entry is a file that was not uploaded alone)."""
    max_bytes: int
    max_entries: int
    max_entry_bytes: int

    @classmethod
    def from_config(cls):
        config = current_app.config
        return cls(int(config["ARCHIVE_MAX_TOTAL_BYTES"]), int(config["ARCHIVE_MAX_ENTRIES"]),
                   int(config["UPLOAD_FILE_SIZE_MAX_BYTES"]))

    def entry_too_large(self):
        return ArchiveLimitError(f"The archive entry is larger than {self.max_entry_bytes} "
                                 "bytes.")

    def check(self, entries, total):
        if entries > self.max_entries:
            raise ArchiveLimitError(
                f"The archive has more than {self.max_entries} entries.")
        if total > self.max_bytes:
            raise ArchiveLimitError(
                f"The archive is larger than {self.max_bytes} bytes uncompressed.")


def unsafe_name(name):
    """Whether an archive entry name is absolute or climbs out with ``..``."""
    normalized = name.replace("\\", "/")
    return (normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized) is not None
            or ".." in normalized.split("/") or "\x00" in normalized)


@dataclass
class Entry:
    """A regular-file entry of an archive: its name, declared size and an opener of its
    bytes, bounded by ``limits.max_entry_bytes``."""
    name: str
    size: int
    opener: object
    limits: Limits

    def open(self):
        """The entry's bytes as a ``Bounded`` stream.

        Raises
        ------
        ArchiveLimitError
            When the declared size is already over the limit.
        """
        if self.size > self.limits.max_entry_bytes:
            raise self.limits.entry_too_large()
        return Bounded(self.opener(), self.limits)


class Bounded(io.RawIOBase):
    """An entry's stream that raises ArchiveLimitError once it yields more than the
    per-entry limit: reads never ask the archive for more than the limit + 1 bytes, so an
    entry whose headers understate its size is cut while it is inflated."""

    def __init__(self, stream, limits):
        self.stream = stream
        self.limits = limits
        self.left = limits.max_entry_bytes + 1  # one byte more shows the entry is over

    def readable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0 or size > self.left:
            size = self.left
        data = self.stream.read(size) if size else b""
        self.left -= len(data)
        if self.left <= 0:
            raise self.limits.entry_too_large()
        return data

    def close(self):
        try:
            self.stream.close()
        finally:
            super().close()


def zip_entries(path, limits, skipped):
    """The safe regular-file entries of a zip, after checking the declared sizes.

    ``skipped`` is a one-element list counting entries that are ignored.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"The zip archive cannot be read ({exc}).") from None
    with archive:
        infos = archive.infolist()
        # Declared sizes bound what zipfile will ever inflate, so this check comes first.
        limits.check(len(infos), sum(info.file_size for info in infos))
        for info in infos:
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if (unsafe_name(info.filename) or stat.S_ISLNK(mode) or info.flag_bits & 0x1):
                skipped[0] += 1
                continue
            yield Entry(info.filename, info.file_size, lambda info=info: archive.open(info),
                        limits)


def targz_entries(path, limits, skipped):
    """The safe regular-file entries of a gzip-compressed tar, streamed; sizes and counts
    are checked as the headers arrive (each header announces its entry's size)."""
    try:
        archive = tarfile.open(path, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"The tar.gz archive cannot be read ({exc}).") from None
    count = total = 0
    try:
        with archive:
            for member in archive:
                count += 1
                total += max(member.size, 0)
                limits.check(count, total)
                if not member.isfile() or unsafe_name(member.name):
                    if not member.isdir():
                        skipped[0] += 1
                    continue
                yield Entry(member.name, member.size,
                            lambda member=member: archive.extractfile(member), limits)
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"The tar.gz archive cannot be read ({exc}).") from None


class Prefixed(io.RawIOBase):
    """A stream whose first bytes were already read (the DICOM sniff) put back in front."""

    def __init__(self, head, stream):
        self.head = head
        self.stream = stream

    def readable(self):
        return True

    def read(self, size=-1):
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
            if len(data) < size:
                data += self.stream.read(size - len(data))
            return data
        return self.stream.read(size)
