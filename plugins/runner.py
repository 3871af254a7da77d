"""Running one plug-in job (API.md 5): input preparation, the runner of the plug-in's type
(``RUNNERS``), and the recording of its results; also ``run-plugin``, the same run without
the queue.

One job: ``work/<jobId>/in`` gets ``<i>.raw|.mhd|.json`` per series (``volumes``); the
runner of the plug-in type fills ``work/<jobId>/out``; ``out/results.json`` is validated
and stored in the job (``plugins.results``); every regular file of ``out/`` is copied
read-only to ``plugin-results/<jobId>/``, beside the job log ``plugin-log.txt``; the work
folder is removed. Any failure ends the job ``failed`` with a message users can act on.
"""
import logging
import os
import secrets
import shutil
import time

from flask import current_app

import storage
from dicom import volumes
from models import PluginDefinition, PluginJob, db
from plugins import definitions, docker_runner, jobs, remote_runner
from plugins.job_log import LOG_NAME, JobLog, PluginRunError, short_message
from plugins.results import copy_outputs, read_results, wait_for_results
from series import check_pvd_range, get_series, validate_pvd

log = logging.getLogger(__name__)

# Plug-in type -> its runner. Every runner is called as
# ``run(plugin, run_id, in_dir, out_dir, work_dir, job_log, config)``: it reads ``in_dir``,
# fills ``out_dir`` (``work_dir`` holds both and its scratch files; ``run_id`` names the run,
# ``config`` is the app's settings) and raises PluginRunError when the run fails.
RUNNERS = {
    "CAD": docker_runner.run,
    "CAD+remote": remote_runner.run,
}


# --- input preparation ----------------------------------------------------------------------

def prepare_input(series, in_dir, job_log):
    """Write ``<i>.raw``, ``<i>.mhd``, ``<i>.json`` for every series entry (5.3).

    ``requiredPrivateTags`` is not passed on, as in the reference (quirk 29).
    """
    os.makedirs(in_dir, exist_ok=True)
    for index, entry in enumerate(series):
        pvd = entry["partialVolumeDescriptor"]
        job_log.line(f"Preparing volume #{index}: series {entry['seriesUid']} "
                     f"(images {pvd['start']} to {pvd['end']}, step {pvd['delta']})")
        try:
            volumes.write_plugin_input(entry["seriesUid"], pvd, in_dir, index)
        except volumes.VolumeError as exc:
            raise PluginRunError(str(exc)) from None
        except storage.UnsafePathError:
            raise PluginRunError(f"Series {entry['seriesUid']} not found.") from None


# --- one job ----------------------------------------------------------------------------------

def execute(plugin, series, work_dir, job_log, run_id, config):
    """Prepare in/, run the plug-in, validate out/results.json; return (results, out_dir)."""
    in_dir, out_dir = os.path.join(work_dir, "in"), os.path.join(work_dir, "out")
    for folder in (in_dir, out_dir):  # (no dicom/: our input is read from the storage)
        os.makedirs(folder, exist_ok=True)
    started = time.monotonic()
    prepare_input(series, in_dir, job_log)
    job_log.line(f"Input prepared in {time.monotonic() - started:.2f} s")
    run = RUNNERS.get(plugin.type)
    if run is None:
        raise PluginRunError(f"Unknown plug-in type: {plugin.type}")
    run(plugin, run_id, in_dir, out_dir, work_dir, job_log, config)
    job_log.line("Plug-in execution done. Validating the results")
    wait_for_results(out_dir)
    return read_results(out_dir, config.get("JSON_MAX_DEPTH")), out_dir


def output_limits(config):
    """copy_outputs' limits from the settings."""
    return {"max_files": config["PLUGIN_RESULTS_MAX_FILES"],
            "max_bytes": config["PLUGIN_RESULTS_MAX_BYTES"]}


def run_job(job_id):
    """Run one claimed job to its end: finished with results, or failed with a message."""
    job = db.session.get(PluginJob, job_id)
    if job is None:
        return
    plugin = db.session.get(PluginDefinition, job.plugin_id)
    series, plugin_id = list(job.series), job.plugin_id
    if plugin is not None:
        db.session.expunge(plugin)  # usable without the session
    db.session.rollback()  # no transaction stays open while the plug-in runs
    results_dir = storage.results_dir(job_id)
    work_dir = storage.work_dir(job_id)
    with JobLog(os.path.join(results_dir, LOG_NAME)) as job_log:
        job_log.line(f"Running job ID: {job_id}")
        try:
            if plugin is None:
                raise PluginRunError(f"No such plugin: {plugin_id}")
            job_log.line(f"Plug-in: {plugin.plugin_name} {plugin.version} ({plugin.type})")
            results, out_dir = execute(plugin, series, work_dir, job_log, job_id,
                                       current_app.config)
            job_log.line("Copying the result files")
            copy_outputs(out_dir, results_dir, job_log, **output_limits(current_app.config))
            storage.publish_results(job_id, keep=True)  # before the row says finished
            jobs.finish_job(job_id, results)
            job_log.line("Job execution done.")
        except PluginRunError as exc:
            job_log.line(f"Error: {exc}")
            jobs.fail_job(job_id, str(exc))
        except storage.StorageError as exc:  # the store failed (reading input, storing results)
            log.warning("Plug-in job %s: %s", job_id, exc)
            job_log.line(f"Error: {exc}")
            jobs.fail_job(job_id, f"The file storage failed: {short_message(exc)}")
        except Exception as exc:
            log.exception("Plug-in job %s failed unexpectedly", job_id)
            job_log.line(f"Error: {type(exc).__name__}: {exc}")
            jobs.fail_job(
                job_id, f"Internal error: {type(exc).__name__}: {short_message(exc)}")
        finally:
            if not current_app.config.get("PLUGIN_KEEP_WORK_DIR"):
                remove_work_dir(work_dir)
    publish_log(job_id)


def publish_log(job_id):
    """Store the job's final log with its results (a failing store leaves it local)."""
    try:
        storage.publish_results(job_id, names=[LOG_NAME])
    except OSError:
        log.exception("The log of job %s could not be stored", job_id)


def run_standalone(plugin_id, series_arguments, out_dir, keep=False, work_root=None):
    """``run-plugin``: run one plug-in on series without the queue, writing its output
    and log to ``out_dir``. Return (results, work folder or None when removed).

    Raises ApiError for a bad plug-in or series argument, PluginRunError when the run fails.
    """
    plugin = definitions.get_plugin(plugin_id)
    entries = []
    for text in series_arguments:
        entry = jobs.parse_series_argument(text)
        pvd = validate_pvd(entry["partialVolumeDescriptor"])
        check_pvd_range(get_series(entry["seriesUid"]), pvd)
        entries.append(entry)
    db.session.expunge(plugin)
    db.session.rollback()
    os.makedirs(out_dir, exist_ok=True)
    root = work_root or storage.root("work")
    os.makedirs(root, exist_ok=True)
    run_id = "run-" + secrets.token_hex(8)
    work_dir = os.path.join(root, run_id)
    try:
        with JobLog(os.path.join(out_dir, LOG_NAME)) as job_log:
            try:
                results, work_out = execute(plugin, entries, work_dir, job_log, run_id,
                                            current_app.config)
                copy_outputs(work_out, out_dir, job_log, read_only=False,
                             **output_limits(current_app.config))
                job_log.line("Done.")
            except PluginRunError as exc:
                job_log.line(f"Error: {exc}")
                raise
    finally:
        if not keep:
            remove_work_dir(work_dir)
    return results, (work_dir if keep else None)


def read_manifest(image_id, docker="docker"):
    """The bytes of /plugin.json in a CAD plug-in's image."""
    return docker_runner.docker_read_file(image_id, "/plugin.json", docker=docker)


def remove_work_dir(path):
    """Remove a work folder, including read-only files a plug-in left."""
    def writable(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o755)
            os.chmod(target, 0o644)
            func(target)
        except OSError:
            pass
    if os.path.isdir(path):
        shutil.rmtree(path, onerror=writable)

