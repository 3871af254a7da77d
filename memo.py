"""Small per-app caches of values that are pure functions of their key."""
import threading
from collections import OrderedDict

from flask import current_app


class Memo:
    """A thread-safe LRU map: ``get(key, build)`` returns the stored value or stores
    ``build()``. A ``build`` that raises stores nothing."""

    def __init__(self, size):
        self.size = size
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, build):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = build()  # outside the lock: it may run SQL or raise ApiError
        with self.lock:
            self.entries[key] = value
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def app_memo(name, size):
    """The app's ``Memo`` called ``name`` (one per app: tests run several apps in one
    process, each with its own database and configuration)."""
    memos = current_app.extensions.get(name)
    if memos is None:
        memos = current_app.extensions.setdefault(name, Memo(size))
    return memos
