"""The admin commands of `flask --app app ...`."""
import click
from flask import current_app

import dbmigrate
from auth import find_user, hash_password, issue_permanent_token
from models import Group, Project, ServerParam, User, db, new_ulid

DEFAULT_TOKEN_DESCRIPTION = "A permanent token for API access"


def create_initial_data():
    """Create the schema and CIRCUS's initial data where absent; return what was created."""
    db.create_all()
    created = []
    project = db.session.execute(
        db.select(Project).where(Project.project_name == "default")).scalars().first()
    if project is None:
        project = Project(project_id=new_ulid(), project_name="default",
                          description="The default DB project", window_priority="dicom,auto",
                          window_presets=[], tags=[], case_attributes_schema={},
                          label_attributes_schema={},
                          icon={"glyph": "calc", "color": "#ffffcc", "backgroundColor": "#248065"})
        db.session.add(project)
        created.append("project default")
    pid = project.project_id
    if db.session.get(Group, 1) is None:
        db.session.add(Group(
            group_id=1, group_name="admin",
            privileges=["createProject", "deleteProject", "manageServer", "personalInfoView"],
            domains=["default"], read_projects=[pid], write_projects=[pid],
            add_series_projects=[pid], view_personal_info_projects=[pid],
            moderate_projects=[pid]))
        created.append("group admin")
    if db.session.get(Group, 2) is None:
        db.session.add(Group(
            group_id=2, group_name="user", privileges=["personalInfoView"], domains=["default"],
            read_projects=[pid], write_projects=[pid], add_series_projects=[pid],
            view_personal_info_projects=[pid], moderate_projects=[]))
        created.append("group user")
    if db.session.get(User, "circus@circus.example.com") is None and find_user("circus") is None:
        db.session.add(User(
            user_email="circus@circus.example.com", login_id="circus",
            password=hash_password("circus"), groups=[1],
            description="Default administrative user", login_enabled=True, last_login_ip="",
            preferences={"theme": "mode_white", "personalInfoView": True,
                         "seriesSearchPresets": [], "caseSearchPresets": [],
                         "pluginJobSearchPresets": []}))
        created.append("user circus")
    if db.session.get(ServerParam, "domains") is None:
        db.session.add(ServerParam(key="domains", value=["default"]))
        created.append("server param domains")
    db.session.commit()
    _sync_group_sequence()
    return created


def _sync_group_sequence():
    """After explicit group IDs, make PostgreSQL's sequence continue after the largest."""
    if db.engine.dialect.name == "postgresql":
        db.session.execute(db.text(
            "SELECT setval(pg_get_serial_sequence('groups', 'group_id'), "
            "(SELECT COALESCE(MAX(group_id), 1) FROM groups))"))
        db.session.commit()


def register(app):
    """Attach every command to the app's CLI."""

    @app.cli.command("init-db")
    def init_db_command():
        """Create (or upgrade) the schema and the initial data if absent (idempotent)."""
        click.echo("Schema: " + _prepare_schema())
        created = create_initial_data()
        click.echo("Created: " + ", ".join(created) if created else "Nothing to do: the database is initialised.")
        click.echo("Data directory: " + current_app.config["CIRCUS_DATA_DIR"])

    @app.cli.command("add-permanent-token")
    @click.argument("user")
    @click.option("-d", "--description", default=DEFAULT_TOKEN_DESCRIPTION, show_default=True)
    def add_permanent_token_command(user, description):
        """Issue a permanent token for USER (e-mail or login ID); the token is the last line."""
        account = find_user(user)
        if account is None:
            raise click.ClickException(f"No user with e-mail or login ID {user!r}.")
        _token_id, token = issue_permanent_token(account.user_email, description)
        db.session.commit()
        click.echo(f"Your permanent access token for {account.user_email} is:")
        click.echo(token)

    @app.cli.command("ulid")
    def ulid_command():
        """Print a new lowercase ULID."""
        click.echo(new_ulid())

    @app.cli.command("worker")
    @click.option("--once", is_flag=True, help="Run what is queued now, then exit.")
    def worker_command(once):
        """Run queued tasks and plug-in jobs until SIGTERM."""
        import worker
        if once:
            click.echo(f"Ran {worker.run_pending(worker.worker_id())} unit(s) of work.")
        else:
            worker.run_forever(current_app._get_current_object())

    @app.cli.command("migrate")
    def migrate_command():
        """Upgrade the database schema to the newest revision, keeping every row."""
        click.echo("Schema: " + _prepare_schema())


def _prepare_schema():
    """Run dbmigrate.prepare(), turning its refusal into a CLI error."""
    try:
        return dbmigrate.prepare()
    except dbmigrate.UnversionedSchemaError as exc:
        raise click.ClickException(str(exc)) from exc
