"""Configuration: defaults, then environment overrides. Every key is read by create_app()."""
import os


def from_environment():
    """Return the configuration dict built from defaults and the environment."""
    data_dir = os.path.abspath(os.environ.get("CIRCUS_DATA_DIR", "./data"))
    return {
        # Everything persistent lives here: database, DICOM files, blobs, results, downloads.
        "CIRCUS_DATA_DIR": data_dir,
        # Where DICOM files, blobs, plug-in results and downloads are stored: file:// (the data
        # directory) or s3://bucket/prefix (an S3-compatible store, through boto3; spool, work
        # and cache folders stay in the data directory of each host).
        "STORAGE_URL": os.environ.get("CIRCUS_STORAGE_URL") or "file://",
        # The S3 endpoint (unset: AWS); credentials come from the standard AWS variables.
        "S3_ENDPOINT_URL": os.environ.get("CIRCUS_S3_ENDPOINT_URL") or None,
        # Create the bucket of CIRCUS_STORAGE_URL at start when it does not exist (else: refuse).
        "S3_CREATE_BUCKET": os.environ.get("CIRCUS_S3_CREATE_BUCKET", "") == "1",
        # Bytes of objects each host keeps in cache/objects/ (read from the store for /rs,
        # exports and plug-in input); least recently used first out.
        "OBJECT_CACHE_BYTES": int(os.environ.get("CIRCUS_OBJECT_CACHE_BYTES", 2 * 1024**3)),
        # Objects without a database row (an import killed between upload and commit), and
        # uploaded files whose import ended without removing them (a failing store), older
        # than this many seconds are removed by the worker's storage sweeps.
        "ORPHAN_GRACE_SECONDS": int(os.environ.get("CIRCUS_ORPHAN_GRACE_SECONDS", 6 * 3600)),
        # Overrides the database only (e.g. postgresql+psycopg://user@host/db).
        "DATABASE_URL": os.environ.get("DATABASE_URL"),
        # Access tokens from POST /login expire after this many seconds (CIRCUS: 1 hour).
        "ACCESS_TOKEN_LIFETIME": int(os.environ.get("CIRCUS_ACCESS_TOKEN_LIFETIME", 3600)),
        # Refresh tokens expire after this many seconds (CIRCUS: 14 days).
        "REFRESH_TOKEN_LIFETIME": int(os.environ.get("CIRCUS_REFRESH_TOKEN_LIFETIME", 1209600)),
        # Value of Access-Control-Allow-Origin.
        "CORS_ORIGIN": os.environ.get("CIRCUS_CORS_ORIGIN", "*"),
        # JSON request bodies larger than this are refused (CIRCUS: 1 MB).
        "JSON_BODY_MAX_BYTES": 1024 * 1024,
        # Request JSON (bodies, filter, sort) nested deeper than this is refused before it is
        # parsed; the deepest legitimate document, a case revision, stays far below it.
        "JSON_MAX_DEPTH": int(os.environ.get("CIRCUS_JSON_MAX_DEPTH", 64)),
        # Per-file limit of multipart uploads (CIRCUS uploadFileSizeMaxBytes: 200 MiB).
        "UPLOAD_FILE_SIZE_MAX_BYTES": int(os.environ.get("CIRCUS_UPLOAD_FILE_SIZE_MAX_BYTES", 209715200)),
        # login-info/full's dicomImageServer; unset: this server's own /rs, at the address the
        # browser used (so the viewer works on any host and port without configuration).
        "DICOM_IMAGE_SERVER_URL": os.environ.get("CIRCUS_DICOM_IMAGE_SERVER_URL") or None,
        # Behind a reverse proxy: take the client address, scheme and host from its
        # X-Forwarded-For/-Proto/-Host (one proxy). Never without a proxy that sets them.
        "TRUST_FORWARDED_HEADERS": os.environ.get("CIRCUS_TRUST_FORWARDED_HEADERS", "") == "1",
        # A built circus-web-ui (index.html, application.js, ...) served on / when set.
        "WEB_UI_DIR": os.environ.get("CIRCUS_WEB_UI_DIR") or None,
        # Archive limits for uploads: total uncompressed bytes and entry count (zip bombs).
        "ARCHIVE_MAX_TOTAL_BYTES": int(os.environ.get("CIRCUS_ARCHIVE_MAX_TOTAL_BYTES", 20 * 1024**3)),
        "ARCHIVE_MAX_ENTRIES": int(os.environ.get("CIRCUS_ARCHIVE_MAX_ENTRIES", 200000)),
        # Search filter limits: nesting depth, $in/$all length, raw filter size in characters.
        "FILTER_MAX_DEPTH": 8,
        "FILTER_MAX_IN_LENGTH": 1000,
        "FILTER_MAX_CHARS": 16384,
        # Minutes east of UTC assumed for DICOM dates without Timezone Offset From UTC.
        "DICOM_DEFAULT_UTC_OFFSET": int(os.environ.get("CIRCUS_DICOM_DEFAULT_UTC_OFFSET", 0)),
        # A running task's worker renews its heartbeat this often (seconds); a task whose
        # heartbeat is older than the stale limit is failed as interrupted (its worker died),
        # by any worker or task listing.
        "TASK_HEARTBEAT_SECONDS": float(os.environ.get("CIRCUS_TASK_HEARTBEAT_SECONDS", 15)),
        "TASK_STALE_SECONDS": float(os.environ.get("CIRCUS_TASK_STALE_SECONDS", 120)),
        # Seconds between polls of the worker when nothing is queued.
        "WORKER_POLL_INTERVAL": float(os.environ.get("CIRCUS_WORKER_POLL_INTERVAL", 1.0)),
        # Seconds between the task-table polls of each open /api/tasks/report stream.
        "TASK_REPORT_POLL_INTERVAL": float(os.environ.get("CIRCUS_TASK_REPORT_POLL_INTERVAL", 0.5)),
        # Number of plug-in jobs the worker runs at once (CIRCUS: 1).
        "PLUGIN_JOB_CONCURRENCY": int(os.environ.get("CIRCUS_PLUGIN_JOB_CONCURRENCY", 1)),
        # The docker command CAD plug-ins run with (a path, or a name looked up in PATH).
        "PLUGIN_DOCKER_COMMAND": os.environ.get("CIRCUS_PLUGIN_DOCKER_COMMAND", "docker"),
        # Seconds a timed-out plug-in container gets between SIGTERM and SIGKILL.
        "PLUGIN_DOCKER_STOP_GRACE": int(os.environ.get("CIRCUS_PLUGIN_DOCKER_STOP_GRACE", 10)),
        # Bytes of a CAD plug-in's stdout/stderr kept in its job log; the rest is dropped.
        "PLUGIN_LOG_MAX_BYTES": int(os.environ.get("CIRCUS_PLUGIN_LOG_MAX_BYTES", 64 * 1024**2)),
        # Limits on a plug-in's out/ (untrusted): files and folders, and bytes of its files.
        # Past either the job fails and nothing is copied to its results.
        "PLUGIN_RESULTS_MAX_FILES": int(os.environ.get("CIRCUS_PLUGIN_RESULTS_MAX_FILES", 10000)),
        "PLUGIN_RESULTS_MAX_BYTES": int(os.environ.get("CIRCUS_PLUGIN_RESULTS_MAX_BYTES", 4 * 1024**3)),
        # Keep work/<jobId>/ (in/, out/) after a plug-in job, for debugging plug-ins.
        "PLUGIN_KEEP_WORK_DIR": os.environ.get("CIRCUS_PLUGIN_KEEP_WORK_DIR", "") == "1",
        # Task downloads older than this many seconds are swept (CIRCUS: 7 days).
        "DOWNLOAD_RETENTION_SECONDS": int(os.environ.get("CIRCUS_DOWNLOAD_RETENTION_SECONDS", 7 * 86400)),
        # werkzeug password hash method (tests use a cheap one; never lower it in production).
        "PASSWORD_HASH_METHOD": "scrypt",
        # Image server (/rs): bytes of decoded volumes kept in memory per worker process.
        "CIRCUS_RS_CACHE_BYTES": int(os.environ.get("CIRCUS_RS_CACHE_BYTES", 1024**3)),
        # Image server: threads per process decoding slices (shared by every viewer).
        "CIRCUS_RS_DECODE_THREADS": int(os.environ.get("CIRCUS_RS_DECODE_THREADS", 2)),
        # Image server WebSocket (flask-sock): a client message over 64 KiB closes the socket
        # (1009); a ping every 30 s ends sockets of vanished clients (their thread with them).
        "SOCK_SERVER_OPTIONS": {"max_message_size": 64 * 1024, "ping_interval": 30},
        # The audit trail (audit.py): off only to measure what it costs.
        "AUDIT_ENABLED": os.environ.get("CIRCUS_AUDIT_ENABLED", "1") != "0",
        # Audit records older than this many days are pruned by the worker (0: kept forever).
        "AUDIT_RETENTION_DAYS": int(os.environ.get("CIRCUS_AUDIT_RETENTION_DAYS", 0)),
        # Failed logins: this many within LOGIN_THROTTLE_WINDOW seconds for one account or
        # from one address block it for LOGIN_THROTTLE_BLOCK seconds (429 with Retry-After).
        "LOGIN_THROTTLE_FAILURES": int(os.environ.get("CIRCUS_LOGIN_THROTTLE_FAILURES", 10)),
        "LOGIN_THROTTLE_WINDOW": int(os.environ.get("CIRCUS_LOGIN_THROTTLE_WINDOW", 300)),
        "LOGIN_THROTTLE_BLOCK": int(os.environ.get("CIRCUS_LOGIN_THROTTLE_BLOCK", 300)),
        # Content-Security-Policy of the web UI's files; unset: routes/web_ui.py's strict one.
        "WEB_UI_CSP": os.environ.get("CIRCUS_WEB_UI_CSP") or None,
        # DICOM listener (`flask --app app dicom-listener`): our called AE title, and the
        # address it listens on (0.0.0.0 opens it to the network; nodes still must be known).
        "DICOM_AET": os.environ.get("CIRCUS_DICOM_AET", "CIRCUS"),
        "DICOM_HOST": os.environ.get("CIRCUS_DICOM_HOST", "127.0.0.1"),
        "DICOM_PORT": int(os.environ.get("CIRCUS_DICOM_PORT", 11112)),
        # A lab's open mode: when set, any calling AE title unknown to the node table may
        # echo and store into this domain (and find/get within it). Off by default.
        "DICOM_OPEN_DOMAIN": os.environ.get("CIRCUS_DICOM_OPEN_DOMAIN") or None,
        # Associations served at once by one listener; more are rejected (transient).
        "DICOM_MAX_ASSOCIATIONS": int(os.environ.get("CIRCUS_DICOM_MAX_ASSOCIATIONS", 10)),
        # Seconds an association may stay silent (and ACSE/DIMSE waits) before it is aborted.
        "DICOM_IDLE_TIMEOUT": float(os.environ.get("CIRCUS_DICOM_IDLE_TIMEOUT", 60)),
        # Seconds between the listener's commits of received instances into the index.
        "DICOM_COMMIT_INTERVAL": float(os.environ.get("CIRCUS_DICOM_COMMIT_INTERVAL", 0.15)),
        # Fixed-user mode for debugging (never in production): every request runs as this user.
        "FIX_USER": os.environ.get("CIRCUS_API_FIX_USER"),
    }


def database_uri(config):
    """The SQLAlchemy URI: DATABASE_URL if set, else SQLite inside the data directory."""
    url = config.get("DATABASE_URL")
    if url:
        if url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url[len("postgres://"):]
        elif url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return url
    return "sqlite:///" + os.path.join(config["CIRCUS_DATA_DIR"], "circus.db")
