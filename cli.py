"""The admin commands of `flask --app app ...`, each a module-level command of ``commands``
(create_app adds them all to the app's CLI)."""
import json
import logging
import sys
import time

import click
from flask import current_app
from flask.cli import AppGroup

import accounts
import admin_records
import audit
import cases
import db_maintenance
import exports
import storage
import table_versions
import worker
from auth import (GLOBAL_PRIVILEGES, SCOPES, check_token_request, compute_privileges,
                  find_user, hash_password, issue_permanent_token, token_expiry_json)
from dicom import importer, instance, net, nodes
from dicom.errors import DicomImportError
from errors import ApiError
from models import (GROUPS_STAMP, Group, Project, ServerParam, SystemState, User, db,
                    new_ulid, parse_iso)
from plugins import definitions, jobs, runner
from plugins.job_log import PluginRunError
from validation import validate

DEFAULT_TOKEN_DESCRIPTION = "A permanent token for API access"

# An AppGroup's commands run inside the app context, as ``@app.cli.command`` ones do.
commands = AppGroup("circus", help="The admin commands of CIRCUS.")


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
    for row in table_versions.initial_rows():
        if db.session.get(SystemState, row["key"]) is None:
            db.session.add(SystemState(**row))
    if db.session.get(SystemState, GROUPS_STAMP) is None:
        # A database whose groups were written before the stamp existed has none, and
        # without one auth.py never reuses computed privileges (a query per request).
        db.session.add(SystemState(key=GROUPS_STAMP, value=new_ulid()))
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


@commands.command("init-db")
def init_db_command():
    """Create (or upgrade) the schema and the initial data if absent (idempotent)."""
    click.echo("Schema: " + _prepare_schema())
    created = create_initial_data()
    click.echo("Created: " + ", ".join(created) if created else "Nothing to do: the database is initialised.")
    click.echo("Data directory: " + current_app.config["CIRCUS_DATA_DIR"])


@commands.command("add-permanent-token")
@click.argument("user")
@click.option("-d", "--description", default=DEFAULT_TOKEN_DESCRIPTION, show_default=True)
@click.option("--scope", "scopes", multiple=True, type=click.Choice(SCOPES),
              help="Narrow the token to this scope (repeatable); default: all the user's rights.")
@click.option("--expires", default=None,
              help="Seconds until the token expires, or an ISO-8601 date; default: never.")
def add_permanent_token_command(user, description, scopes, expires):
    """Issue a permanent token for USER (e-mail or login ID); the token is the last line."""
    account = find_user(user)
    if account is None:
        raise click.ClickException(f"No user with e-mail or login ID {user!r}.")
    seconds = int(expires) if expires and expires.lstrip("-").isdigit() else None
    try:
        scopes, expires_at = check_token_request(
            list(scopes) or None, seconds, expires if expires and seconds is None else None)
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    token_id, token = issue_permanent_token(account.user_email, description, scopes, expires_at)
    audit.record("token-create", "token", token_id, user_email=account.user_email,
                 detail={"scopes": scopes, "via": "cli"})
    db.session.commit()
    if scopes or expires_at:
        click.echo(f"Scopes: {', '.join(scopes) if scopes else 'all'}; expires: "
                   f"{token_expiry_json(expires_at) or 'never'}")
    click.echo(f"Your permanent access token for {account.user_email} is:")
    click.echo(token)


@commands.command("audit-verify")
def audit_verify_command():
    """Prove the audit chain unbroken, or name its first bad record (exit status 1)."""
    started = time.monotonic()
    checked, bad, why = audit.verify()
    elapsed = time.monotonic() - started
    if bad is not None:
        click.echo(f"Audit chain BROKEN at record {bad}: {why} "
                   f"({checked} record(s) verified before it).")
        sys.exit(1)
    click.echo(f"Audit chain intact: {checked} record(s) verified in {elapsed:.2f} s.")


@commands.command("audit-export")
@click.option("--since", required=True, help="ISO-8601 date or date-time (UTC).")
@click.option("--until", default=None, help="ISO-8601 date or date-time (UTC), exclusive.")
@click.option("-o", "--out", type=click.File("w"), default="-", show_default=True,
              help="File to write the JSON lines to.")
def audit_export_command(since, until, out):
    """Write the audit records from --since on as JSON lines, oldest first."""
    try:
        since_at = parse_iso(since)
        until_at = parse_iso(until) if until else None
    except ValueError:
        raise click.BadParameter("not an ISO-8601 date") from None
    for item in audit.export(since_at, until_at):
        out.write(json.dumps(item, separators=(",", ":")) + "\n")


@commands.command("audit-prune")
@click.option("--days", type=int, default=None,
              help="Keep this many days (default: the AUDIT_RETENTION_DAYS setting).")
def audit_prune_command(days):
    """Delete audit records older than the retention, keeping the chain verifiable."""
    days = current_app.config["AUDIT_RETENTION_DAYS"] if days is None else days
    if not days or days <= 0:
        raise click.ClickException("No retention: give --days or set "
                                   "CIRCUS_AUDIT_RETENTION_DAYS.")
    click.echo(f"Pruned {audit.prune(days)} audit record(s).")


@commands.command("ulid")
def ulid_command():
    """Print a new lowercase ULID."""
    click.echo(new_ulid())


@commands.command("worker")
@click.option("--once", is_flag=True, help="Run what is queued now, then exit.")
def worker_command(once):
    """Run queued tasks and plug-in jobs until SIGTERM."""
    if once:
        click.echo(f"Ran {worker.run_pending(worker.worker_id())} unit(s) of work.")
    else:
        worker.run_forever(current_app._get_current_object())


@commands.command("dicom-listener")
@click.option("--host", default=None, help="Address to listen on (default: CIRCUS_DICOM_HOST).")
@click.option("--port", type=int, default=None, help="Port (default: CIRCUS_DICOM_PORT).")
def dicom_listener_command(host, port):
    """Serve DICOM (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) to the registered nodes until
    SIGTERM or Ctrl-C."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # a line per PDU otherwise
    net.run_listener(current_app._get_current_object(), host, port)


@commands.command("dicom-node-add")
@click.argument("ae_title")
@click.option("--host", default="", help="Host or address the node calls from (empty: any).")
@click.option("--port", type=int, default=None, help="Its port (needed to send it C-MOVEs).")
@click.option("--domain", required=True, help="Domain its stores go into and queries see.")
@click.option("--allow", default="echo,store,find", show_default=True,
              help="Comma-separated services: echo, store, find, get, move.")
def dicom_node_add_command(ae_title, host, port, domain, allow):
    """Register a DICOM node, as POST /api/admin/dicom-nodes does."""
    body = {"aeTitle": ae_title, "host": host, "port": port, "domain": domain,
            "allow": [s.strip() for s in allow.split(",") if s.strip()]}
    _run_api_call(nodes.create_node, body, "dicom-node-create")
    click.echo(f"Added DICOM node {ae_title}.")


@commands.command("dicom-node-list")
def dicom_node_list_command():
    """List the DICOM nodes: AE title, host, port, domain, allowed services."""
    for node in nodes.list_nodes():
        click.echo(f"{node.ae_title}\t{node.host or '*'}\t{node.port or '-'}\t{node.domain}"
                   f"\t{','.join(node.allow)}")


@commands.command("dicom-node-remove")
@click.argument("ae_title")
def dicom_node_remove_command(ae_title):
    """Remove a DICOM node."""
    try:
        nodes.delete_node(ae_title)
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"Removed DICOM node {ae_title}.")


@commands.command("migrate")
def migrate_command():
    """Upgrade the database schema to the newest revision, keeping every row."""
    click.echo("Schema: " + _prepare_schema())


@commands.command("migrate-storage")
@click.option("--to", "target_url", required=True, help="The new store: s3://bucket/prefix.")
@click.option("--create-bucket", is_flag=True, help="Create the bucket if it does not exist.")
def migrate_storage_command(target_url, create_bucket):
    """Copy the stored files (DICOM, blobs, plug-in results, downloads) of the current store
    into another; resumable (objects already there with their size are skipped)."""
    config = {**current_app.config, "S3_CREATE_BUCKET": create_bucket or
              current_app.config.get("S3_CREATE_BUCKET")}
    try:
        target = storage.open_store(target_url, current_app.config["CIRCUS_DATA_DIR"], config)
    except storage.StorageConfigError as exc:
        raise click.ClickException(str(exc)) from None
    source = storage.store()
    to_copy, skipped = storage.migration_plan(source, target)
    total = sum(size for _key, size in to_copy)
    click.echo(f"{len(to_copy)} objects ({total / 1e6:.1f} MB) to copy, {len(skipped)} "
               f"already in {target_url}.")
    try:
        with click.progressbar(length=total, label="Copying", file=click.get_text_stream(
                "stderr")) as bar:
            storage.migrate(source, target, to_copy, lambda _key, size: bar.update(size))
    except (storage.MigrationError, OSError) as exc:
        raise click.ClickException(f"The copy stopped: {exc} Run the command again to "
                                   "resume.") from None
    click.echo(f"Copied {len(to_copy)} objects ({total / 1e6:.1f} MB), sizes verified; "
               f"skipped {len(skipped)} already there. Set CIRCUS_STORAGE_URL={target_url} "
               "(and CIRCUS_S3_ENDPOINT_URL) on every host to use it.")


@commands.command("register-cad-plugin")
@click.argument("image_id")
@click.option("-y", "--yes", is_flag=True, help="Register without asking for confirmation.")
def register_cad_plugin_command(image_id, yes):
    """Register the CAD plug-in of a local Docker image (IMAGE_ID: 64 hex) from its
    /plugin.json manifest."""
    try:
        definitions.check_new_cad_id(image_id)
        manifest = runner.read_manifest(
            image_id, current_app.config["PLUGIN_DOCKER_COMMAND"])
        doc = definitions.cad_definition_from_manifest(image_id, manifest)
    except (ApiError, PluginRunError) as exc:
        raise click.ClickException(getattr(exc, "message", None) or str(exc)) from None
    click.echo(json.dumps(doc, indent=2))
    if not yes and not click.confirm("Is this OK?"):
        return
    definitions.create_plugin(doc)
    click.echo(f"Registered {doc['pluginName']} v{doc['version']}")


@commands.command("register-plugin-job")
@click.argument("plugin")
@click.argument("series", nargs=-1, required=True)
@click.option("--user", "user_ref", required=True, help="E-mail or login ID of the owner.")
@click.option("--priority", type=int, default=0, show_default=True)
def register_plugin_job_command(plugin, series, user_ref, priority):
    """Queue a job of PLUGIN (ID or name) on SERIES (UID[:start:end:delta]...) as a user,
    with the rules of POST /api/plugin-jobs; print the job ID."""
    try:
        click.echo(jobs.register_job_as(plugin, user_ref, series, priority))
    except ApiError as exc:
        raise click.ClickException(exc.message) from None


@commands.command("run-plugin")
@click.argument("plugin_id")
@click.argument("series", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder that receives the plug-in's output and plugin-log.txt.")
@click.option("--keep", is_flag=True, help="Keep the work folder (in/, out/).")
@click.option("--work", "work_root", type=click.Path(file_okay=False),
              help="Where the work folder is made (default: the data folder's work/).")
def run_plugin_command(plugin_id, series, out_dir, keep, work_root):
    """Run one plug-in on SERIES (UID[:start:end:delta]...) without the queue and write
    its output to --out (what plug-in authors use to test)."""
    try:
        results, kept = runner.run_standalone(plugin_id, series, out_dir, keep,
                                                      work_root)
    except (ApiError, PluginRunError) as exc:
        raise click.ClickException(getattr(exc, "message", None) or str(exc)) from None
    click.echo(f"Finished: {len((results.get('results') or {}).get('lesionCandidates') or [])}"
               f" lesion candidate(s); output in {out_dir}")
    if kept:
        click.echo(f"Work folder kept: {kept}")


@commands.command("clear-token")
@click.option("-a", "--all", "include_permanent", is_flag=True,
              help="Also delete permanent tokens.")
@click.option("--expired", is_flag=True,
              help="Only delete tokens whose access token has expired (housekeeping).")
def clear_token_command(include_permanent, expired):
    """Delete every session token (all users must log in again) and print the count."""
    count = accounts.clear_tokens(include_permanent, expired_only=expired)
    click.echo(f"Deleted {count} access token(s).")
    if not include_permanent:
        click.echo("Use --all flag to also delete permanent tokens.")


@commands.command("generate-password-hash")
def generate_password_hash_command():
    """Ask for a password twice and print its hash (a value for users.password)."""
    first = click.prompt("Input raw password", hide_input=True)
    if click.prompt("Retype the same password", hide_input=True) != first:
        raise click.ClickException("Password mismatch.")
    click.echo(hash_password(first))


@commands.command("db-check")
@click.option("-t", "--target", multiple=True,
              type=click.Choice(list(db_maintenance.RECORD_CHECKS)),
              help="Check only this collection (repeatable).")
def db_check_command(target):
    """Validate every stored record against its schema; stop at the first invalid one."""
    def progress(name, count):
        click.echo(f"Validating: {name}" if count is None else
                   f"  Validated: {count} {'item' if count == 1 else 'items'}.")
    try:
        db_maintenance.check_records(list(target) or None, progress)
    except db_maintenance.InvalidRecord as exc:
        click.echo(f"There was a validation error in {exc.target} {exc.key!r}:", err=True)
        for error in exc.errors:
            click.echo(f"  {error['dataPath'] or '(root)'}: {error['message']}", err=True)
        raise click.exceptions.Exit(1) from None


@commands.command("create-user")
@click.argument("email")
@click.argument("login_id")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--group", "groups", multiple=True, help="Group ID or name (repeatable).")
@click.option("--description", default="", help="Free text shown to administrators.")
def create_user_command(email, login_id, password, groups, description):
    """Create a user, as POST /api/admin/users does."""
    group_ids = []
    for reference in groups:
        group = admin_records.find_group(reference)
        if group is None:
            raise click.ClickException(f"No group {reference!r}.")
        group_ids.append(group.group_id)
    body = {"userEmail": email, "loginId": login_id, "password": password,
            "loginEnabled": True, "description": description, "groups": group_ids}
    _run_api_call(admin_records.create_user, body, "user-create")
    click.echo(f"Created user {email} ({login_id}).")


@commands.command("create-group")
@click.argument("name")
@click.option("--privilege", "privileges", multiple=True,
              type=click.Choice([name for name, _caption in GLOBAL_PRIVILEGES]),
              help="Global privilege to grant (repeatable).")
@click.option("--domain", "domains", multiple=True, help="Series domain (repeatable).")
def create_group_command(name, privileges, domains):
    """Create a group granting the given privileges and domains (no project roles)."""
    body = {**admin_records.empty_group(name), "privileges": list(dict.fromkeys(privileges)),
            "domains": list(dict.fromkeys(domains))}
    group_id = _run_api_call(admin_records.create_group, body, "group-create")
    click.echo(f"Created group {group_id} ({name}).")


@commands.command("register-case")
@click.argument("project")
@click.argument("series", nargs=-1, required=True)
@click.option("--user", "user_ref", required=True, help="E-mail or login ID of the creator.")
@click.option("--tags", default="", help="Comma-separated tags.")
def register_case_command(project, series, user_ref, tags):
    """Create a case in PROJECT (ID or name) from SERIES (UID[:start:end:delta]...)
    as a user, with the rules of POST /api/cases; print the case ID."""
    account = find_user(user_ref)
    if account is None:
        raise click.ClickException(f"No user with e-mail or login ID {user_ref!r}.")
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    try:
        project_id = cases.find_project(project).project_id
        entries = [cases.series_entry_from_text(text) for text in series]
        case_id = cases.create_case(account.user_email, compute_privileges(account),
                                    project_id, entries, tag_list)
    except ApiError as exc:
        db.session.rollback()
        raise click.ClickException(exc.message) from None
    click.echo(case_id)


@commands.command("import-series")
@click.option("-d", "--domain", required=True, help="Domain of the imported series.")
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def import_series_command(domain, recursive, paths):
    """Import DICOM files, folders, zip and tar.gz archives into DOMAIN."""
    param = db.session.get(ServerParam, "domains")
    if domain not in (param.value if param is not None else []):
        raise click.ClickException(f'The domain "{domain}" is not in the server '
                                   'parameter "domains".')
    files = importer.collect_paths(paths, recursive)
    try:
        with click.progressbar(length=len(files), label="Importing", show_pos=True) as bar:
            result = importer.import_paths(domain, files, on_file=lambda _path: bar.update(1))
    except DicomImportError as exc:
        raise click.ClickException(f"{exc} (after {exc.imported} imported)") from None
    click.echo(f"{result.entities} files imported into {result.series} series, "
               f"{result.skipped} skipped")


@commands.command("dump-dicom")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def dump_dicom_command(path):
    """Print, as JSON, what the importer extracts from a DICOM file."""
    try:
        record = instance.read_record(path)
    except DicomImportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(instance.record_json(record), indent=2, ensure_ascii=False))


@commands.command("refresh-series-parameters")
@click.option("--max-date", "--maxDate", "max_date", default=None,
              help="Only series created at or before this ISO date.")
def refresh_series_parameters_command(max_date):
    """Re-read the parameters of stored series from their first image (updatedAt kept)."""
    try:
        limit = parse_iso(max_date) if max_date else None
    except ValueError:
        raise click.ClickException(f"Invalid date {max_date!r}.") from None
    refreshed, failed = importer.refresh_parameters(limit)
    click.echo(f"Refreshed {refreshed} series, {failed} failed.")


@commands.command("index-instances")
def index_instances_command():
    """Index the instances (and study attributes) of series stored before they were kept,
    for DICOM networking and DICOMweb (updatedAt kept)."""
    indexed, failed = importer.index_instances()
    click.echo(f"Indexed {indexed} series, {failed} failed.")


@commands.command("export-case")
@click.argument("case_ids", nargs=-1, required=True)
@click.option("-o", "--out", default="case-exports", show_default=True,
              help="One archive (.tar.gz, .tgz or .zip) for all cases, or a folder "
                   "that receives <caseId>.tar.gz per case.")
@click.option("-t", "--type", "label_pack_type", default="isolated", show_default=True,
              type=click.Choice(["isolated", "combined"]), help="Label packing.")
@click.option("--zip", "use_zip", is_flag=True, help="Write zip instead of tar.gz.")
@click.option("--crlf", is_flag=True, help="CRLF line endings in the MHD headers.")
@click.option("-c", "--continue", "keep_going", is_flag=True,
              help="Go on with the next case after an error (folder output).")
def export_case_command(case_ids, out, label_pack_type, use_zip, crlf, keep_going):
    """Export cases in the MHD format of POST /api/cases/export-mhd."""
    try:
        files = exports.export_case_files(list(case_ids), out, label_pack_type, use_zip,
                                          "crlf" if crlf else "lf", keep_going, click.echo)
    except exports.ExportError as exc:
        raise click.ClickException(str(exc)) from None
    for path in files:
        click.echo(f"Written: {path}")


def _run_api_call(function, body, schema):
    """Validate ``body`` and call ``function(body)``; API errors become CLI errors."""
    try:
        return function(validate(body, schema))
    except ApiError as exc:
        details = "; ".join(f"{e['dataPath'] or '(root)'} {e['message']}"
                            for e in exc.extra.get("validationErrors", []))
        raise click.ClickException(f"{exc.message} {details}".strip()) from None


def _prepare_schema():
    """Run db_maintenance.prepare(), turning its refusal into a CLI error."""
    try:
        return db_maintenance.prepare()
    except db_maintenance.UnversionedSchemaError as exc:
        raise click.ClickException(str(exc)) from exc
