"""Factories that create only what a test needs, through the real models."""
import secrets

from auth import hash_password, issue_permanent_token
from models import Group, PluginDefinition, Project, Series, User, db, new_ulid


def make_group(name, **fields):
    """A group; ``fields`` use the model's attribute names (read_projects=[...])."""
    group = Group(group_name=name, **fields)
    db.session.add(group)
    db.session.flush()
    return group


def make_user(email, login_id=None, groups=(), password="password", **fields):
    user = User(user_email=email, login_id=login_id or email.split("@")[0],
                password=hash_password(password), groups=list(groups),
                preferences=fields.pop("preferences", {"personalInfoView": True}), **fields)
    db.session.add(user)
    db.session.flush()
    return user


def make_token(user_email):
    """A permanent token for the user (committed); returns the clear token."""
    _tid, token = issue_permanent_token(user_email, "test token")
    db.session.commit()
    return token


def make_project(name="project", **fields):
    project = Project(project_id=new_ulid(), project_name=name, description="",
                      icon={"glyph": "calc", "color": "#ffffff", "backgroundColor": "#000000"},
                      **fields)
    db.session.add(project)
    db.session.flush()
    return project


def make_series(series_uid, domain="default", images="1-10", modality="CT", patient_info=None,
                **fields):
    """A series row without files (for tests that only need the record)."""
    series = Series(series_uid=series_uid, study_uid=fields.pop("study_uid", series_uid + ".0"),
                    width=fields.pop("width", 512), height=fields.pop("height", 512),
                    images=images, modality=modality, domain=domain,
                    parameters=fields.pop("parameters", {}), **fields)
    series.set_patient_info(patient_info if patient_info is not None else
                            {"patientId": "P1", "patientName": "Anzu", "age": 30, "sex": "F"})
    db.session.add(series)
    db.session.flush()
    return series


def make_plugin(plugin_id=None, name="Lung CAD", version="1.0.0", type="CAD", **fields):
    """A plug-in definition (CAD by default; a 64-hex ID is made up when none is given)."""
    plugin = PluginDefinition(
        plugin_id=plugin_id or secrets.token_hex(32),
        type=type, plugin_name=name, version=version,
        description=fields.pop("description", "A test plug-in"),
        run_configuration=fields.pop("run_configuration", {"timeout": 900, "gpus": ""}),
        icon=fields.pop("icon", {"glyph": "calc", "color": "#ffffff", "backgroundColor": "#008800"}),
        display_strategy=fields.pop("display_strategy", []), **fields)
    db.session.add(plugin)
    db.session.flush()
    return plugin
