"""Helpers shared by the plug-in test modules: roles on plug-ins, definitions as JSON."""
import os
import shutil

import pydicom

import storage
from auth import PLUGIN_ROLES
from models import User, db
from tests.factories import make_group, make_series

ALL_ROLES = list(PLUGIN_ROLES)


def grant(email, plugin_id, roles=ALL_ROLES, domains=("default",), privileges=()):
    """Give a user a new group holding ``roles`` on ``plugin_id`` (commits)."""
    fields = {PLUGIN_ROLES[role]: [plugin_id] for role in roles}
    group = make_group(f"plugin group {email} {plugin_id[:8]} {len(roles)}",
                       domains=list(domains), privileges=list(privileges), **fields)
    user = db.session.get(User, email)
    user.groups = list(user.groups or []) + [group.group_id]
    db.session.commit()
    return group


def cad_definition(plugin_id="a" * 64, **overrides):
    """A complete CAD definition as POST /api/admin/plugins takes it."""
    doc = {"pluginId": plugin_id, "pluginName": "Lung CAD", "version": "1.2.3", "type": "CAD",
           "description": "Finds nodules", "runConfiguration": {"timeout": 900, "gpus": ""},
           "icon": {"glyph": "calc", "color": "#ffffff", "backgroundColor": "#008800"},
           "displayStrategy": [{"type": "LesionCandidates", "feedbackKey": "lesions",
                                "caption": "Lesions"}]}
    doc.update(overrides)
    return doc


def remote_definition(endpoint="http://127.0.0.1:9/", secret="s3cret", key="authentication",
                      **overrides):
    """A complete remote definition (its pluginId is derived by the server)."""
    doc = {"pluginName": "Remote CAD", "version": "0.1.0", "type": "CAD+remote",
           "description": "Runs elsewhere",
           "runConfiguration": {"adapter": "default", "parameters": {
               "endpoint": endpoint, key: secret, "timeout": 30}},
           "icon": {"glyph": "calc", "color": "#ffffff", "backgroundColor": "#000088"},
           "displayStrategy": []}
    doc.update(overrides)
    return doc


def store_sample_series(folder, series_uid=None, domain="default", patient_info=None):
    """Copy the real DICOM files of ``folder`` into storage as instances 1..n of one series
    (as the importer stores them) and add its row; return the series UID."""
    files = sorted(str(p) for p in folder.iterdir() if p.suffix == ".dcm")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series_uid = series_uid or str(first.SeriesInstanceUID)
    for number, path in enumerate(files, start=1):
        target = storage.instance_path(series_uid, number)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    make_series(series_uid, domain=domain, images=f"1-{len(files)}" if len(files) > 1 else "1",
                modality=str(first.get("Modality", "OT")), width=int(first.Columns),
                height=int(first.Rows), study_uid=str(first.StudyInstanceUID),
                patient_info=patient_info)
    db.session.commit()
    return series_uid
