"""What a plug-in run reports: its log ``plugin-log.txt`` and the error that ends it.

Every runner writes timestamped lines (and the plug-in's raw output) to the job log; a run
that cannot reach its end raises ``PluginRunError``, whose message becomes the job's
``errorMessage``.
"""
import os
import threading

from models import iso, utcnow

LOG_NAME = "plugin-log.txt"
ERROR_DETAIL_CHARS = 300  # how much of an unexpected exception's text a message keeps


class PluginRunError(Exception):
    """Raised when a job cannot run to its end; the message becomes the job's errorMessage."""


class JobLog:
    """``plugin-log.txt``: timestamped lines, and raw output of the plug-in appended as is."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self._fh = open(path, "ab", buffering=0)
        self._lock = threading.Lock()

    def line(self, text):
        """Append ``[<ISO time>] text`` (every line of a multi-line text is stamped)."""
        stamp = "[" + iso(utcnow()) + "] "
        data = "".join(stamp + part + "\n" for part in str(text).splitlines() or [""])
        self.raw(data.encode("utf-8", "replace"))

    def raw(self, data):
        with self._lock:
            self._fh.write(data)

    def close(self):
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def short_message(exc):
    """The text of an exception, cut to ERROR_DETAIL_CHARS for a user-facing message."""
    text = str(exc)
    return text if len(text) <= ERROR_DETAIL_CHARS else text[:ERROR_DETAIL_CHARS] + "..."
