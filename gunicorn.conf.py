"""The served configuration: gunicorn reads this file from the working directory, so
``gunicorn 'app:create_app()'`` started in the project root (scripts/serve.sh, the
Dockerfile, the e2e tests) gets these settings. Command-line options (``-b``, ``-w``, ...)
override them.

Why gthread: every open web UI tab keeps a ``GET /api/tasks/report`` stream open for hours.
A sync worker holding one serves nobody else, so sync workers cannot hold the 50+ streams
this server must keep while short requests go on. With gthread each stream holds one thread
of a worker (it sleeps between cheap polls of the tasks table); the other threads keep
serving short requests. A worker accepts connections beyond its free threads and queues
them behind the streams, so each worker needs more threads than streams it may hold:
``threads`` is sized for all streams landing on one worker. The image server's volume
WebSockets (/rs/ws/volume, one per logged-in UI) hold a thread each in the same way. Measured with
``bench/streams.py`` (figures in its docstring and the export issue's report).
"""
import os

# Default address: this machine only (HOST=0.0.0.0 for every interface); `-b` replaces it.
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"]
# Processes: one per core is enough for Python; raise with WEB_CONCURRENCY.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
# Threads per worker: SSE streams (one thread each) plus threads for short requests.
threads = int(os.environ.get("GUNICORN_THREADS", "96"))
# Open connections per worker (streams + keep-alive clients).
worker_connections = 1000
# Seconds a keep-alive connection may idle between requests.
keepalive = 5
# Report streams never end by themselves: do not wait long for them on shutdown/reload.
graceful_timeout = 10
# A worker silent for this long is restarted (uploads and downloads stream; nothing long
# runs inside a request, see DESIGN.md).
timeout = 60


def post_worker_init(worker):
    """Image server sockets (/rs/ws/volume) never end by themselves: on SIGTERM tell them to
    close (1001) so the worker stops within ``graceful_timeout`` without cutting them.

    A gthread worker's timeout does not cover its request threads (the main loop notifies
    the arbiter), so a long-lived socket is never killed as a "silent" worker.
    """
    import signal

    from dicom import transfer  # imported in the worker: the arbiter never loads app code

    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):
        transfer.stopping.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop)


def on_starting(server):
    """The store is checked before anything listens: a store that does not answer or
    refuses the credentials ends gunicorn here with its message alone ("App failed to
    load", exit 4). Left to the workers, the arbiter could get a worker's refusal while
    still starting, outside the loop that handles it, and die with a traceback (exit 1)."""
    import click  # the project's modules, as in post_fork: only when serving it
    import config
    import storage

    settings = config.from_environment()
    try:
        storage.open_store(settings["STORAGE_URL"], settings["CIRCUS_DATA_DIR"], settings)
    except click.ClickException as exc:
        server.log.error("App failed to load: %s", exc.format_message())
        raise SystemExit(4) from None


def post_fork(server, worker):
    """A setting the app refuses at start (a store that does not answer or refuses the
    credentials: a ClickException raised by ``create_app``) ends gunicorn with its message:
    raised as gunicorn's AppImportError, the worker prints it alone and the arbiter stops
    ("App failed to load", exit 4) instead of a traceback per worker and booting again."""
    import click  # in the worker, as the app's own modules
    from gunicorn.errors import AppImportError

    load_wsgi = worker.load_wsgi

    def load_wsgi_or_refuse():
        try:
            load_wsgi()
        except click.ClickException as exc:
            raise AppImportError(exc.format_message()) from None

    worker.load_wsgi = load_wsgi_or_refuse
