"""A run's results (API.md 5.6): waiting for ``out/results.json``, validating it, and
copying ``out/`` into the job's results folder.

``out/`` is written by the plug-in, so it is untrusted input: links and special files are
never followed, names with control characters (or not UTF-8) are skipped, and a tree with
more entries, bytes or nesting than the limits fails the job before anything is copied.
The copy goes to a temporary folder beside the target first and is renamed into place, so a
failed copy leaves nothing half-copied.
"""
import os
import shutil
import tempfile
import time
import unicodedata

from jsonschema import Draft7Validator

from plugins.job_log import LOG_NAME, PluginRunError
from validation import decode_json, load_schema

RESULTS_NAME = "results.json"
RESULTS_WAIT_MS = 2000  # how long results.json may take to appear after the run (5.6)
RESULTS_POLL_SECONDS = 0.5
RESULTS_MAX_BYTES = 16 * 1024 * 1024  # results.json is stored in the job row
OUTPUT_MAX_DEPTH = 32  # folders inside out/; deeper trees only serve to exhaust paths
COPY_CHUNK = 1024 * 1024


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


def read_results(out_dir, max_depth=None):
    """Parse and validate out/results.json; return the whole document (5.6).

    Decoded by ``validation.decode_json`` (no NaN, at most ``max_depth`` levels; default
    the JSON_MAX_DEPTH setting), so a document nested without end fails the job cleanly.
    """
    path = os.path.join(out_dir, RESULTS_NAME)
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            raise ValueError(f"{RESULTS_NAME} is not a regular file")
        if os.path.getsize(path) > RESULTS_MAX_BYTES:
            raise ValueError(f"{RESULTS_NAME} is larger than {RESULTS_MAX_BYTES} bytes")
        with open(path, "rb") as fh:
            results = decode_json(fh.read(), max_depth=max_depth)
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


# --- copying out/ -----------------------------------------------------------------------------

def safe_name(name):
    """Whether a file name written by a plug-in may be kept: no control or format
    characters (newlines, escapes, bidi overrides) and valid UTF-8 (no surrogates)."""
    return name not in ("", ".", "..") and not any(
        unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)


def scan_outputs(out_dir, max_files, max_bytes, job_log=None):
    """The regular files of ``out_dir`` to copy, as (relative parts, size), parents first.

    Every entry (file, folder, link) counts against ``max_files``, and the walk stops at the
    first entry past it, so a folder of a million files is refused after reading
    ``max_files`` names. Links, special files, unsafe names and the job log's name are
    skipped (with a line in the job log), never followed.

    Raises
    ------
    PluginRunError
        When out/ holds more than ``max_files`` entries, more than ``max_bytes`` bytes of
        regular files, or folders nested deeper than OUTPUT_MAX_DEPTH.
    """
    files, count, total = [], 0, 0
    pending = [((), out_dir)]
    while pending:
        parts, folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > max_files:
                    raise PluginRunError(
                        f"The plug-in output has more than {max_files} files and folders.")
                rel = parts + (entry.name,)
                reason = _skip_reason(entry, rel)
                if reason:
                    if job_log is not None:  # repr: a name must not forge log lines
                        shown = "/".join(parts + (entry.name if safe_name(entry.name)
                                                  else repr(entry.name),))
                        job_log.line(f"Skipped {shown}: {reason}")
                elif entry.is_dir(follow_symlinks=False):
                    if len(rel) > OUTPUT_MAX_DEPTH:
                        raise PluginRunError("The plug-in output is nested more than "
                                             f"{OUTPUT_MAX_DEPTH} folders deep.")
                    pending.append((rel, entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_size
                    if total > max_bytes:
                        raise PluginRunError(
                            f"The plug-in output is larger than {max_bytes} bytes.")
                    files.append((rel, entry.path))
    return files


def _skip_reason(entry, rel):
    if not safe_name(entry.name):
        return "unsafe file name"
    if rel == (LOG_NAME,):
        return "the job log's name"
    if entry.is_symlink() or not (entry.is_dir(follow_symlinks=False)
                                  or entry.is_file(follow_symlinks=False)):
        return "not a regular file"
    return None


def copy_outputs(out_dir, target_dir, job_log=None, read_only=True, *, max_files, max_bytes):
    """Copy the regular files of out/ (sub-folders too) into ``target_dir`` (5.6): checked
    by ``scan_outputs``, copied to a temporary folder beside ``target_dir``, then renamed
    into it. Files are made read-only unless ``read_only`` is false.

    Raises PluginRunError when out/ exceeds a limit; ``target_dir`` is then unchanged.
    """
    files = scan_outputs(out_dir, max_files, max_bytes, job_log)
    target_dir = os.path.abspath(target_dir)
    os.makedirs(target_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(target_dir))
    try:
        budget = max_bytes
        for parts, source in files:
            destination = os.path.join(staging, *parts)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            budget -= _copy_file(source, destination, budget)
            if read_only:
                os.chmod(destination, 0o444)
        _move_into(staging, target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_file(source, destination, budget):
    """Copy one file without following a link swapped in since the scan; return its size."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    copied = 0
    with os.fdopen(fd, "rb") as src, open(destination, "xb") as dst:
        for chunk in iter(lambda: src.read(COPY_CHUNK), b""):
            copied += len(chunk)
            if copied > budget:  # grown since the scan
                raise PluginRunError("The plug-in output is larger than the allowed size.")
            dst.write(chunk)
    return copied


def _move_into(staging, target_dir):
    """Rename every entry of ``staging`` into ``target_dir``, merging existing folders."""
    for name in os.listdir(staging):
        source, destination = os.path.join(staging, name), os.path.join(target_dir, name)
        if os.path.isdir(source) and os.path.isdir(destination) \
                and not os.path.islink(destination):
            _move_into(source, destination)
        else:
            if os.path.isdir(destination) and not os.path.islink(destination):
                raise PluginRunError(f"Cannot replace the folder {name} with a file.")
            os.replace(source, destination)


_VALIDATOR = []


def _results_validator():
    if not _VALIDATOR:
        _VALIDATOR.append(Draft7Validator(load_schema("plugin-results")))
    return _VALIDATOR[0]
