"""The audit trail: what is recorded, the hash chain, audit-verify/-export/-prune,
GET /api/admin/audit, login throttling, the default-password warning, response headers."""
import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

import accounts
import audit
from auth import hash_password
from dicom.importer import import_paths
from models import AuditEvent, LoginThrottle, Series, User, db, utcnow
from tests.case_helpers import UID1, UID2, create_case, seed_series
from tests.sample_series import store_series

HEAD_FIRST = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.547"

LOGIN = {"grant_type": "password", "client_id": "circus-front", "client_secret": "x"}


def events(app, action=None):
    with app.app_context():
        query = db.select(AuditEvent).order_by(AuditEvent.seq)
        if action:
            query = query.where(AuditEvent.action == action)
        rows = db.session.execute(query).scalars().all()
        db.session.expunge_all()
        return rows


def login(client, username, password, **environ):
    return client.post("/login", data={**LOGIN, "username": username, "password": password},
                       environ_base=environ)


def verify(app):
    return app.test_cli_runner().invoke(args=["audit-verify"])


@pytest.fixture
def personal(app, tokens):
    """bob sees patient information (privilege and preference)."""
    with app.app_context():
        db.session.get(User, "bob@example.com").preferences = {"personalInfoView": True}
        db.session.commit()
    seed_series(app)


def test_logins_and_failures_are_recorded(app, client, tokens):
    with app.app_context():
        db.session.get(User, "bob@example.com").password = hash_password("secret")
        db.session.commit()
    assert login(client, "bob", "wrong").status_code == 400
    assert login(client, "nobody", "wrong").status_code == 400
    assert login(client, "bob", "secret").status_code == 200
    failed = events(app, "login-failed")
    assert [(e.user_email, e.target_id, e.outcome) for e in failed] == [
        ("bob@example.com", "bob@example.com", "failure"), ("nobody", "nobody", "failure")]
    ok = events(app, "login")
    assert [(e.user_email, e.outcome, e.client) for e in ok] == [
        ("bob@example.com", "success", "127.0.0.1")]


def test_token_creation_and_deletion_name_the_token_id_never_its_value(app, client,
                                                                        auth_headers):
    made = client.post("/api/tokens", json={"description": "s", "scopes": ["read"]},
                       headers=auth_headers["bob"]).get_json()
    client.get("/api/login-info", headers={"Authorization": f"Bearer {made['accessToken']}"})
    assert client.delete(f"/api/tokens/{made['tokenId']}",
                         headers=auth_headers["bob"]).status_code == 204
    rows = events(app)
    assert [(e.action, e.target_id) for e in rows] == [
        ("token-create", made["tokenId"]), ("token-delete", made["tokenId"])]
    assert rows[0].detail == '{"scopes":["read"]}'
    with app.app_context():
        dump = json.dumps([list(r) for r in db.session.execute(
            sa.text("SELECT * FROM audit_events")).all()], default=str)
    assert made["accessToken"] not in dump


def test_answers_with_patient_information_are_recorded(app, client, auth_headers, personal,
                                                       default_project):
    res = client.get("/api/series?limit=20", headers=auth_headers["bob"])
    assert res.status_code == 200 and "patientInfo" in res.get_json()["items"][0]
    client.get(f"/api/series/{UID1}", headers=auth_headers["bob"])
    case_id = create_case(client, auth_headers["bob"], default_project)
    client.get(f"/api/cases/{case_id}", headers=auth_headers["bob"])
    client.get("/api/cases", headers=auth_headers["bob"])
    rows = events(app)
    assert [(e.action, e.target_id) for e in rows] == [
        ("series-search", None), ("series-view", UID1), ("case-view", case_id),
        ("case-search", None)]
    shown = [item["seriesUid"] for item in res.get_json()["items"]]
    assert json.loads(rows[0].detail) == {"seriesUids": shown} and sorted(shown) == [UID1, UID2]
    assert json.loads(rows[3].detail) == {"caseIds": [case_id]}
    assert all(e.user_email == "bob@example.com" and e.status == 200 for e in rows)
    assert rows[1].token_id and len(rows[1].token_id) == 40


def test_searches_without_patient_information_are_not_recorded(app, client, auth_headers):
    seed_series(app)
    with app.app_context():  # bob's preference leaves patient information out
        db.session.get(User, "bob@example.com").preferences = {"personalInfoView": False}
        db.session.commit()
    assert client.get("/api/series", headers=auth_headers["bob"]).status_code == 200
    assert events(app) == []


def test_a_deletion_and_its_record_commit_together(app, client, auth_headers, personal,
                                                   default_project):
    assert client.delete(f"/api/series/{UID2}", headers=auth_headers["alice"]).status_code == 204
    create_case(client, auth_headers["alice"], default_project)  # uses UID1
    res = client.delete(f"/api/series/{UID1}", headers=auth_headers["alice"])
    assert res.status_code >= 400
    rows = events(app, "series-delete")
    assert [(e.target_id, e.outcome, e.status) for e in rows] == [
        (UID2, "success", None), (UID1, "failure", res.status_code)]


def test_admin_changes_are_recorded(app, client, auth_headers):
    res = client.post("/api/admin/groups", json={"groupName": "new"},
                      headers=auth_headers["alice"])
    rows = events(app, "admin-post")
    assert [(e.target_id, e.status) for e in rows] == [("/api/admin/groups", res.status_code)]


def test_volume_downloads_are_recorded(app, client, auth_headers, tokens, dicom_dir):
    with app.app_context():
        uid = store_series(sorted((dicom_dir / "head-first").iterdir())[:3])
    res = client.get(f"/rs/series/{uid}/volume", headers=auth_headers["alice"])
    assert res.status_code == 200
    rows = events(app, "rs-volume")
    assert [(e.target_id, e.user_email) for e in rows] == [(uid, "alice@example.com")]


def test_dicomweb_answers_with_patient_data_are_recorded(app, client, auth_headers, personal,
                                                         dicom_dir):
    with app.app_context():
        import_paths("default", [str(p) for p in sorted((dicom_dir / "head-first").iterdir())])
        series = db.session.get(Series, HEAD_FIRST)
        study = series.study_uid
    headers = auth_headers["bob"]
    res = client.get("/dicom-web/studies", headers=headers)
    shown = [match["0020000D"]["Value"][0] for match in res.get_json()]
    assert res.status_code == 200 and study in shown
    [search] = events(app, "dicomweb-search")
    assert json.loads(search.detail)["uids"] == shown and search.user_email == "bob@example.com"
    base = f"/dicom-web/studies/{study}/series/{HEAD_FIRST}"
    res = client.get(base, headers={**headers, "Accept": 'multipart/related; type="application/dicom"'})
    assert res.status_code == 200 and res.data
    [wado] = events(app, "wado")
    assert (wado.target_type, wado.target_id, json.loads(wado.detail)["instances"]) == (
        "series", HEAD_FIRST, 10)
    instance = client.get(f"{base}/instances", headers=headers).get_json()[0]["00080018"]["Value"][0]
    res = client.get(f"{base}/instances/{instance}/frames/1", headers={
        **headers, "Accept": 'multipart/related; type="application/octet-stream"'})
    assert res.status_code == 200
    assert [(e.target_type, e.target_id) for e in events(app, "wado-frames")] == [
        ("instance", instance)]


def test_audit_off_records_nothing(app, client, auth_headers, personal):
    app.config["AUDIT_ENABLED"] = False
    client.get(f"/api/series/{UID1}", headers=auth_headers["bob"])
    assert events(app) == []


# --- the chain ---------------------------------------------------------------------------

def _some_records(app, client, auth_headers, count=5):
    seed_series(app)
    for _ in range(count):
        client.get(f"/api/series/{UID1}", headers=auth_headers["alice"])


def test_verify_proves_an_unbroken_chain(app, client, auth_headers):
    _some_records(app, client, auth_headers)
    rows = events(app)
    assert [e.seq for e in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:]))
    result = verify(app)
    assert result.exit_code == 0 and "intact: 5 record(s)" in result.output


@pytest.mark.parametrize("tamper, bad, why", [
    ("UPDATE audit_events SET user_email = 'mallory@example.com' WHERE seq = 3", 3, "content"),
    ("UPDATE audit_events SET at = '2020-01-01 00:00:00.000000' WHERE seq = 2", 2, "content"),
    ("DELETE FROM audit_events WHERE seq = 4", 4, "missing"),
    ("UPDATE audit_events SET prev_hash = hash WHERE seq = 3", 3, "prevHash"),
    ("DELETE FROM audit_events WHERE seq = 5", 5, "ends before the head"),
])
def test_verify_names_the_first_bad_record(app, client, auth_headers, tamper, bad, why):
    _some_records(app, client, auth_headers)
    with app.app_context():
        db.session.execute(sa.text(tamper))
        db.session.commit()
    result = verify(app)
    assert result.exit_code == 1
    assert f"BROKEN at record {bad}:" in result.output and why in result.output


def test_a_forged_record_with_a_recomputed_hash_still_breaks_the_chain(app, client,
                                                                       auth_headers):
    _some_records(app, client, auth_headers)
    with app.app_context():
        row = db.session.get(AuditEvent, 2)
        row.target_id = "1.2.3.forged"
        fields = {name: getattr(row, name) for name in audit._FIELDS}
        row.hash = audit.record_hash(row.prev_hash, fields)
        db.session.commit()
    result = verify(app)
    assert result.exit_code == 1 and "BROKEN at record 3:" in result.output


def test_concurrent_commits_keep_one_chain(app, auth_headers, personal):
    import threading
    errors = []

    def reader():
        client = app.test_client()
        for _ in range(10):
            res = client.get(f"/api/series/{UID1}", headers=auth_headers["bob"])
            if res.status_code != 200:
                errors.append(res.status_code)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [e.seq for e in events(app)] == list(range(1, 41))
    assert verify(app).exit_code == 0


def test_prune_keeps_the_chain_verifiable(app, client, auth_headers):
    _some_records(app, client, auth_headers, count=6)
    with app.app_context():
        db.session.execute(db.update(AuditEvent).where(AuditEvent.seq <= 4)
                           .values(at=utcnow() - timedelta(days=40)))
        db.session.commit()
    result = app.test_cli_runner().invoke(args=["audit-prune", "--days", "30"])
    assert result.exit_code == 0 and "Pruned 4 audit record(s)" in result.output
    rows = events(app)
    assert [(e.seq, e.action) for e in rows] == [
        (4, audit.PRUNED), (5, "series-view"), (6, "series-view"), (7, "audit-prune")]
    assert json.loads(rows[0].detail)["pruned"] == 4
    assert verify(app).exit_code == 0
    with app.app_context():  # a marker nobody pruned is a forgery
        db.session.execute(sa.text("DELETE FROM audit_events WHERE seq = 7"))
        db.session.execute(sa.text("UPDATE audit_head SET seq = 6, hash = "
                                   "(SELECT hash FROM audit_events WHERE seq = 6)"))
        db.session.commit()
    result = verify(app)
    assert result.exit_code == 1 and "BROKEN at record 4" in result.output


def test_audit_export_writes_json_lines(app, client, auth_headers, tmp_path):
    _some_records(app, client, auth_headers, count=3)
    out = tmp_path / "audit.jsonl"
    since = (utcnow() - timedelta(hours=1)).isoformat()
    result = app.test_cli_runner().invoke(args=["audit-export", "--since", since,
                                                "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3]
    assert lines[0]["action"] == "series-view" and lines[0]["targetId"] == UID1
    result = app.test_cli_runner().invoke(args=["audit-export", "--since", "2999-01-01"])
    assert result.exit_code == 0 and result.output == ""
    result = app.test_cli_runner().invoke(args=["audit-export", "--since", "yesterday"])
    assert result.exit_code != 0


def test_admin_audit_search(app, client, auth_headers):
    login(client, "alice", "wrong")
    _some_records(app, client, auth_headers, count=2)
    res = client.get('/api/admin/audit?filter={"action":"login-failed"}',
                     headers=auth_headers["alice"])
    assert res.status_code == 200, res.get_json()
    body = res.get_json()
    assert body["totalItems"] == 1 and body["items"][0]["userEmail"] == "alice@example.com"
    res = client.get('/api/admin/audit?sort={"seq":1}&limit=2', headers=auth_headers["alice"])
    assert [item["action"] for item in res.get_json()["items"]] == ["login-failed",
                                                                     "series-view"]
    assert client.get("/api/admin/audit", headers=auth_headers["bob"]).status_code == 401
    res = client.get('/api/admin/audit?filter={"password":1}', headers=auth_headers["alice"])
    assert res.status_code == 400


# --- login throttling --------------------------------------------------------------------

@pytest.fixture
def app_config():
    return {"LOGIN_THROTTLE_FAILURES": 3, "LOGIN_THROTTLE_WINDOW": 300,
            "LOGIN_THROTTLE_BLOCK": 300}


def _set_password(app, email, password):
    with app.app_context():
        db.session.get(User, email).password = hash_password(password)
        db.session.commit()


def test_a_burst_of_wrong_passwords_is_throttled(app, client, tokens):
    _set_password(app, "bob@example.com", "secret")
    assert [login(client, "bob", "wrong").status_code for _ in range(3)] == [400, 400, 400]
    res = login(client, "bob", "secret")  # the right password, still refused
    assert res.status_code == 429
    assert res.get_json() == {"error": "Too many failed logins: try again later."}
    assert 290 <= int(res.headers["Retry-After"]) <= 301
    assert login(client, "bob@example.com", "secret").status_code == 429
    assert [e.outcome for e in events(app, "login-throttled")] == ["denied", "denied"]
    with app.app_context():  # the window ends
        db.session.execute(db.update(LoginThrottle).values(
            blocked_until=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    assert login(client, "bob", "secret").status_code == 200


def test_failures_from_one_address_throttle_every_account(app, client, tokens):
    _set_password(app, "alice@example.com", "secret")
    for name in ("u1", "u2", "u3"):
        assert login(client, name, "wrong", REMOTE_ADDR="10.0.0.9").status_code == 400
    assert login(client, "alice", "secret", REMOTE_ADDR="10.0.0.9").status_code == 429
    assert login(client, "alice", "secret", REMOTE_ADDR="10.0.0.10").status_code == 200


def test_failures_outside_the_window_are_forgotten(app, client, tokens):
    _set_password(app, "bob@example.com", "secret")
    for _ in range(2):
        login(client, "bob", "wrong")
    with app.app_context():
        db.session.execute(db.update(LoginThrottle).values(
            window_start=utcnow() - timedelta(seconds=301)))
        db.session.commit()
    login(client, "bob", "wrong")
    assert login(client, "bob", "secret").status_code == 200


# --- a safe first start, headers ----------------------------------------------------------

def test_login_info_full_says_the_default_password_is_in_use(app, client, auth_headers):
    body = client.get("/api/login-info/full", headers=auth_headers["circus"]).get_json()
    assert body["defaultPasswordInUse"] is True and "default password" in body["warnings"][0]
    _set_password(app, "circus@circus.example.com", "a better one")
    body = client.get("/api/login-info/full", headers=auth_headers["circus"]).get_json()
    assert body["defaultPasswordInUse"] is False and "warnings" not in body
    with app.app_context():
        assert accounts.default_password_in_use() is False


def test_api_answers_are_not_cached_nor_sniffed(client, auth_headers):
    for res in (client.get("/api/status"), client.get("/api/login-info",
                                                      headers=auth_headers["bob"]),
                client.get("/api/nothing-here")):
        assert res.headers["Cache-Control"] == "no-store"
        assert res.headers["X-Content-Type-Options"] == "nosniff"
