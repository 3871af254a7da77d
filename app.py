"""The application factory: ``create_app()`` is what gunicorn and ``flask --app app`` load."""
import logging
import os

from flask import Flask, current_app, request
from flask_migrate import Migrate
from sqlalchemy import event
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.middleware.proxy_fix import ProxyFix

import accounts
import audit
import auth
import cli
import config as config_module
import json_codec
import storage
import table_versions
import validation
from errors import register_error_handlers
from models import db
from routes import BLUEPRINTS, web_ui

log = logging.getLogger(__name__)
MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "POST, GET, PUT, OPTIONS, PATCH, DELETE",
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "86400",
}


def _sqlite_pragmas(dbapi_connection, _record):
    """SQLite for a web server: WAL, foreign keys, a busy timeout, case-sensitive LIKE."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000",
                   "foreign_keys=ON", "case_sensitive_like=ON"):
        cursor.execute("PRAGMA " + pragma)
    cursor.close()


class CaseInsensitiveRouting:
    """WSGI middleware: CIRCUS matches paths case-insensitively.

    Only when a path does not match as sent are its literal segments (those that appear in
    some route) lowercased; IDs, e-mails and file paths keep their case.
    """

    def __init__(self, app, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app
        self.literals = None

    def _literals(self):
        if self.literals is None:
            words = set()
            for rule in self.app.url_map.iter_rules():
                for segment in rule.rule.split("/"):
                    if segment and "<" not in segment:
                        words.add(segment)
            self.literals = words
        return self.literals

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path != path.lower():
            adapter = self.app.url_map.bind_to_environ(environ)
            try:
                adapter.match()
            except (NotFound, MethodNotAllowed):
                literals = self._literals()
                fixed = "/".join(s.lower() if s.lower() in literals else s for s in path.split("/"))
                environ["PATH_INFO"] = fixed
            except Exception:  # redirects and the like: leave the path alone
                pass
        return self.wsgi_app(environ, start_response)


def _preflight():
    """Any OPTIONS below /api answers 200 with an empty body, without authentication."""
    if request.method == "OPTIONS" and request.path.startswith("/api"):
        return "", 200


def _cors(response):
    response.headers["Access-Control-Allow-Origin"] = current_app.config["CORS_ORIGIN"]
    for name, value in CORS_HEADERS.items():
        response.headers[name] = value
    return response


def _security_headers(response):
    """Answers carry patient data: never cached, never content-sniffed. The web UI's own
    files keep their caching and get a content security policy (routes/web_ui.py)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.blueprint != "web_ui":
        response.headers["Cache-Control"] = "no-store"
    return response


def _warn_default_password(app):
    """Log a warning at every start while the account circus has its default password."""
    try:
        with app.app_context():
            if accounts.default_password_in_use():
                log.warning('The account "%s" still has its default password: change it '
                            "(README, first steps).", accounts.DEFAULT_ADMIN)
    except Exception:  # no schema yet (before init-db): nothing to warn about
        pass


def create_app(config=None):
    """Build the Flask app; ``config`` overrides the environment (tests pass a dict)."""
    app = Flask(__name__)
    app.config.update(config_module.from_environment())
    if config:
        app.config.update(config)
    # The worker's job processes rebuild this app from its settings (plugins/job_source.py):
    # they are handed the factory, so nothing below imports this module.
    app.config["APP_FACTORY"] = create_app
    app.config["CIRCUS_DATA_DIR"] = os.path.abspath(app.config["CIRCUS_DATA_DIR"])
    if app.config.get("WEB_UI_DIR"):
        app.config["WEB_UI_DIR"] = os.path.abspath(app.config["WEB_UI_DIR"])
        if not os.path.isfile(os.path.join(app.config["WEB_UI_DIR"], "index.html")):
            raise ValueError(f"CIRCUS_WEB_UI_DIR has no index.html: {app.config['WEB_UI_DIR']}")
    os.makedirs(app.config["CIRCUS_DATA_DIR"], exist_ok=True)
    storage.init_app(app)  # before anything is served: a store that does not answer stops here
    app.config.setdefault("SQLALCHEMY_DATABASE_URI", config_module.database_uri(app.config))
    engine_options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options
    engine_options.setdefault("json_deserializer", json_codec.loads_stored)
    if not app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # A database server may drop idle connections; a SQLite file never does.
        engine_options.setdefault("pool_pre_ping", True)
    app.config["MAX_CONTENT_LENGTH"] = None  # uploads are streamed; each route sets its limit
    app.json = json_codec.JsonProvider(app)
    app.json.sort_keys = False
    app.url_map.strict_slashes = False
    logging.basicConfig(level=logging.INFO if not app.testing else logging.WARNING)

    db.init_app(app)
    Migrate(app, db, directory=MIGRATIONS_DIR, render_as_batch=True)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
        table_versions.install(db.engine)

    app.before_request(_preflight)
    app.before_request(auth.authenticate_request)
    app.before_request(validation.check_content_type)
    app.after_request(_cors)
    app.after_request(_security_headers)
    audit.install(app)
    register_error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    if app.config.get("WEB_UI_DIR"):
        # Last, and only when configured: otherwise every other path stays a 404 (any method).
        app.register_blueprint(web_ui.bp)
    app.cli.commands.update(cli.commands.commands)
    app.wsgi_app = CaseInsensitiveRouting(app, app.wsgi_app)
    if app.config.get("TRUST_FORWARDED_HEADERS"):
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
    if not app.testing:
        _warn_default_password(app)
    return app
