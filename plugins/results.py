"""A run's results (API.md 5.6): waiting for ``out/results.json``, validating it, and
copying ``out/`` into the job's results folder without following links.
"""
import json
import os
import shutil
import time

from jsonschema import Draft7Validator

import storage
from plugins.job_log import PluginRunError
from validation import load_schema

RESULTS_NAME = "results.json"
RESULTS_WAIT_MS = 2000  # how long results.json may take to appear after the run (5.6)
RESULTS_POLL_SECONDS = 0.5
RESULTS_MAX_BYTES = 16 * 1024 * 1024  # results.json is stored in the job row


def wait_for_results(out_dir):
    """Wait up to 2 s (polling every 0.5 s) for out/results.json (5.6)."""
    path = os.path.join(out_dir, RESULTS_NAME)
    deadline = time.monotonic() + RESULTS_WAIT_MS / 1000
    while not os.path.isfile(path):
        if time.monotonic() >= deadline:
            raise PluginRunError(
                f"Timeout: File out/{RESULTS_NAME} did not appear within {RESULTS_WAIT_MS}ms")
        time.sleep(RESULTS_POLL_SECONDS)
    return path


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def read_results(out_dir):
    """Parse and validate out/results.json; return the whole document (5.6)."""
    path = os.path.join(out_dir, RESULTS_NAME)
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            raise ValueError(f"{RESULTS_NAME} is not a regular file")
        if os.path.getsize(path) > RESULTS_MAX_BYTES:
            raise ValueError(f"{RESULTS_NAME} is larger than {RESULTS_MAX_BYTES} bytes")
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8")
        results = json.loads(text, parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PluginRunError(f"Plug-in validation failed: {exc}") from None
    errors = sorted(_results_validator().iter_errors(results),
                    key=lambda e: list(e.absolute_path))
    if errors:
        reasons = "; ".join(
            ("/".join(str(p) for p in e.absolute_path) or "results.json") + " " + e.message
            for e in errors[:5])
        raise PluginRunError(f"Plug-in validation failed: {reasons}")
    return results


def copy_outputs(out_dir, target_dir, job_log=None, read_only=True):
    """Copy every regular file of out/ (sub-folders too) into ``target_dir``; links and
    special files are skipped, never followed. Files are made read-only."""
    for folder, dirs, files in os.walk(out_dir, followlinks=False):
        relative = os.path.relpath(folder, out_dir)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            source = os.path.join(folder, name)
            rel = name if relative == "." else os.path.join(relative, name)
            if os.path.islink(source) or not os.path.isfile(source):
                if job_log is not None:
                    job_log.line(f"Skipped {rel}: not a regular file")
                continue
            destination = storage.inside(target_dir, *rel.split(os.sep))
            with open(source, "rb") as src, storage.atomic_file(destination, fsync=False) as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
            if read_only:
                os.chmod(destination, 0o444)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


_VALIDATOR = []


def _results_validator():
    if not _VALIDATOR:
        _VALIDATOR.append(Draft7Validator(load_schema("plugin-results")))
    return _VALIDATOR[0]
