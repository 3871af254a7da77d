"""Every blueprint of the API, in registration order (literal routes before :id routes
are handled inside each blueprint by Werkzeug's rule ordering). ``web_ui`` is not listed:
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
from routes.admin import groups as admin_groups
from routes.admin import users as admin_users
from routes.admin import projects as admin_projects
from routes.admin import plugins as admin_plugins
from routes.admin import server_params as admin_server_params
from routes.admin import onetime_urls as admin_onetime_urls
from routes.admin import plugin_job_manager as admin_plugin_job_manager

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
    admin_groups.bp,
    admin_users.bp,
    admin_projects.bp,
    admin_plugins.bp,
    admin_server_params.bp,
    admin_onetime_urls.bp,
    admin_plugin_job_manager.bp,
]
