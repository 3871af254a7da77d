"""Every blueprint of the API, in registration order (literal routes before :id routes
are handled inside each blueprint by Werkzeug's rule ordering). The /api/admin children are
registered only through their parent (routes/admin), never on their own: on their own they
would answer at the root (/groups...) without the admin guard. ``web_ui`` is not listed:
create_app registers it last, and only when CIRCUS_WEB_UI_DIR is set."""
from routes import status
from routes import login
from routes import login_info
from routes import tokens
from routes import users
from routes import preferences
from routes import series
from routes import cases
from routes import projects
from routes import blobs
from routes import my_lists
from routes import tasks
from routes import plugins
from routes import plugin_jobs
from routes import plugin_job_queue
from routes import plugin_displays
from routes import openapi
from routes import admin
from routes import rs
from routes import dicomweb

BLUEPRINTS = [
    status.bp,
    login.bp,
    login_info.bp,
    tokens.bp,
    users.bp,
    preferences.bp,
    series.bp,
    cases.bp,
    projects.bp,
    blobs.bp,
    my_lists.bp,
    tasks.bp,
    plugins.bp,
    plugin_jobs.bp,
    plugin_job_queue.bp,
    plugin_displays.bp,
    openapi.bp,
    admin.bp,
    rs.bp,
    dicomweb.bp,
]
