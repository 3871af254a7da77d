"""Voxel label blobs: opaque bytes stored as ``blobs/<sha1>``, keyed by their SHA-1.

An upload is streamed: optionally gunzipped piece by piece, hashed and written to a temporary
file beside its final name, and renamed into place only when its size and hash are right.
"""
import hashlib
import logging
import os
import re
import zlib

import storage
from errors import ApiError

log = logging.getLogger(__name__)

MAX_BLOB_BYTES = 20 * 1024 * 1024  # CIRCUS: 20 MiB, counted after decompression
# A gzip body is never much larger than its content; this bounds the raw bytes read as well.
MAX_RAW_BYTES = MAX_BLOB_BYTES + MAX_BLOB_BYTES // 8 + 65536
CHUNK = 64 * 1024
GZIP_ENCODING = re.compile(r"^(x-)?gzip$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


class BlobError(ApiError):
    """Raised when an uploaded blob is refused."""


class BlobTooLarge(BlobError):
    """Raised when a blob exceeds MAX_BLOB_BYTES after decompression."""

    def __init__(self):
        super().__init__(413, "request entity too large")


def _chunks(stream, gzipped):
    """Yield the decompressed pieces of a request body, never more than CHUNK at a time."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    raw_total = 0
    while True:
        piece = stream.read(CHUNK)
        if not piece:
            break
        raw_total += len(piece)
        if raw_total > MAX_RAW_BYTES:
            raise BlobTooLarge()
        if inflater is None:
            yield piece
            continue
        data = piece
        try:
            while data:
                out = inflater.decompress(data, CHUNK)
                if out:
                    yield out
                if inflater.eof:
                    break  # trailing bytes after the gzip member are ignored
                data = inflater.unconsumed_tail
        except zlib.error:
            raise BlobError(400, "The content could not be decompressed.") from None
    if inflater is not None:
        if not inflater.eof and raw_total:
            raise BlobError(400, "The content could not be decompressed.")


def store(sha1, stream, content_encoding=None):
    """Store a request body under its SHA-1.

    Parameters
    ----------
    sha1 : str
        The hash named in the URL; the (decompressed) content must have exactly this SHA-1.
    stream : file-like
        The raw request body.
    content_encoding : str, optional
        ``gzip`` or ``x-gzip`` decompresses the body first; anything else is taken as is.

    Raises
    ------
    BlobError
        413 above MAX_BLOB_BYTES, 400 when empty or when the hash does not match.
    """
    gzipped = bool(GZIP_ENCODING.match((content_encoding or "").strip().lower()))
    hasher = hashlib.sha1()
    size = 0
    valid = SHA1_RE.match(sha1) is not None
    # Even for a hash that cannot match, the body is consumed to answer like CIRCUS does
    # (into a local file that is never kept).
    target = (storage.published_file(storage.blob_key(sha1)) if valid else
              storage.atomic_file(os.path.join(storage.root("blobs"), "rejected")))
    with target as fh:
        for piece in _chunks(stream, gzipped):
            size += len(piece)
            if size > MAX_BLOB_BYTES:
                raise BlobTooLarge()
            hasher.update(piece)
            fh.write(piece)
        if size == 0:
            raise BlobError(400, "Empty content was sent.")
        if not valid or hasher.hexdigest() != sha1:
            raise BlobError(400, "Hash mismatch.")


def path_of(sha1):
    """The file of a stored blob, or None if there is none."""
    if not isinstance(sha1, str) or not SHA1_RE.match(sha1):
        return None
    try:
        path = storage.blob_path(sha1)
    except FileNotFoundError:
        return None
    return path if os.path.isfile(path) else None


def missing(hashes):
    """The given hashes (deduplicated, in order) that have no stored blob."""
    seen, result = set(), []
    for sha1 in hashes:
        if sha1 in seen:
            continue
        seen.add(sha1)
        if not isinstance(sha1, str) or not SHA1_RE.match(sha1) or \
                not storage.store().exists(storage.blob_key(sha1)):
            result.append(sha1)
    return result
