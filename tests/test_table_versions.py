"""Search totals reused while their tables are unchanged (table_versions.py): every kind of
write renews the stamp, so a total is never stale after a write through the application."""
import pytest
import sqlalchemy as sa
from sqlalchemy import event

import table_versions
from models import Series, SystemState, db
from series import delete_series
from tests.factories import make_series

PAGE = {"limit": 2, "sort": '{"seriesUid": 1}'}  # a full page: the total must be counted


@pytest.fixture
def three_series(app):
    with app.app_context():
        for n in (1, 2, 3):
            make_series(f"1.2.7.{n}", modality="CT")
        db.session.commit()


@pytest.fixture
def counts(app):
    """How many COUNT statements the database has run (appended to as they run)."""
    seen = []

    def note(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("SELECT COUNT"):
            seen.append(statement)

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", note)
    yield seen
    with app.app_context():
        event.remove(db.engine, "before_cursor_execute", note)


def total(client, headers, **params):
    res = client.get("/api/series", query_string={**PAGE, **params}, headers=headers)
    assert res.status_code == 200
    return res.get_json()["totalItems"]


def stamp(app):
    with app.app_context():
        return table_versions.stamps(["series"])


def test_reads_keep_the_stamp_and_reuse_the_total(app, client, auth_headers, three_series,
                                                  counts):
    before = stamp(app)
    assert before is not None
    assert total(client, auth_headers["alice"]) == 3
    assert total(client, auth_headers["alice"]) == 3
    assert len(counts) == 1  # the second request reused the first total
    assert stamp(app) == before


def test_orm_insert_renews_the_stamp(app, client, auth_headers, three_series, counts):
    assert total(client, auth_headers["alice"]) == 3
    before = stamp(app)
    with app.app_context():
        make_series("1.2.7.4")
        db.session.commit()
    assert stamp(app) != before
    assert total(client, auth_headers["alice"]) == 4
    assert len(counts) == 2


def test_core_delete_and_update_renew_the_stamp(app, client, auth_headers, three_series):
    assert total(client, auth_headers["alice"]) == 3
    assert total(client, auth_headers["alice"], filter='{"modality": "CT"}') == 3
    with app.app_context():
        delete_series("1.2.7.3")  # a Core DELETE, files and rows
        db.session.commit()
    assert total(client, auth_headers["alice"]) == 2
    with app.app_context():
        db.session.execute(sa.update(Series).where(Series.series_uid == "1.2.7.2")
                           .values(modality="MR"))
        db.session.commit()
    assert total(client, auth_headers["alice"], filter='{"modality": "CT"}') == 1


def test_a_rolled_back_write_does_not_stop_the_next_one(app, client, auth_headers, three_series):
    """The "already stamped" mark ends with its transaction, committed or not."""
    assert total(client, auth_headers["alice"]) == 3
    with app.app_context():
        make_series("1.2.7.8")
        db.session.rollback()
        make_series("1.2.7.9")
        db.session.commit()
    assert total(client, auth_headers["alice"]) == 4


def test_a_rolled_back_savepoint_does_not_stop_the_next_write(app, client, auth_headers,
                                                              three_series):
    assert total(client, auth_headers["alice"]) == 3
    with app.app_context():
        savepoint = db.session.begin_nested()
        make_series("1.2.7.8")
        savepoint.rollback()  # takes the stamp written inside it along
        make_series("1.2.7.9")
        db.session.commit()
    assert total(client, auth_headers["alice"]) == 4


def test_without_version_rows_totals_are_always_counted(app, client, auth_headers, three_series,
                                                         counts):
    with app.app_context():
        db.session.execute(sa.delete(SystemState).where(SystemState.key.like("version:%")))
        db.session.commit()
    assert total(client, auth_headers["alice"]) == 3
    assert total(client, auth_headers["alice"]) == 3
    assert len(counts) == 2
    with app.app_context():
        make_series("1.2.7.4")
        db.session.commit()
    assert total(client, auth_headers["alice"]) == 4


def test_case_totals_follow_tag_changes(app, client, auth_headers, default_project):
    """Case totals depend on the tag table too: a tag edit shows at once."""
    from models import ClinicalCase, CaseTag
    with app.app_context():
        make_series("1.2.7.1")
        db.session.commit()
    ids = []
    for _ in range(3):
        res = client.post("/api/cases", headers=auth_headers["bob"], json={
            "projectId": default_project, "tags": ["a"],
            "series": [{"seriesUid": "1.2.7.1", "partialVolumeDescriptor":
                        {"start": 1, "end": 10, "delta": 1}}]})
        assert res.status_code == 201
        ids.append(res.get_json()["caseId"])

    def tagged(tag):
        res = client.get("/api/cases", headers=auth_headers["bob"],
                         query_string={"limit": 2, "filter": f'{{"tags": "{tag}"}}'})
        return res.get_json()["totalItems"]

    assert tagged("a") == 3
    res = client.put(f"/api/cases/{ids[0]}/tags", json=["b"], headers=auth_headers["bob"])
    assert res.status_code == 204
    assert tagged("a") == 2
    with app.app_context():
        assert {t.tag for t in db.session.execute(sa.select(CaseTag)).scalars()} == {"a", "b"}
        assert db.session.get(ClinicalCase, ids[0]).tags == ["b"]


def test_a_write_before_a_rolled_back_savepoint_is_stamped(app, client, auth_headers,
                                                           three_series):
    assert total(client, auth_headers["alice"]) == 3
    with app.app_context():
        make_series("1.2.7.8")
        savepoint = db.session.begin_nested()
        make_series("1.2.7.9")
        savepoint.rollback()
        db.session.commit()  # 1.2.7.8 stays: the table changed
    assert total(client, auth_headers["alice"]) == 4


def test_a_transaction_that_wrote_a_table_neither_uses_nor_fills_the_cache(
        app, client, auth_headers, three_series):
    """Its own uncommitted rows are not those of the stamp it read: the total is counted,
    and not kept (a rollback would otherwise leave a wrong total under a current stamp)."""
    assert total(client, auth_headers["alice"]) == 3  # cached under the current stamp
    key = (("series", ("default",)), (None, '{"seriesUid": 1}', 2, 0, None, True))
    with app.test_request_context("/"):
        before = table_versions.stamps(["series"])
        make_series("1.2.7.8")  # pending: flushed by cached_count
        counted = table_versions.cached_count(
            key, ("series",), lambda: db.session.scalar(sa.select(sa.func.count()).select_from(Series)))
        assert counted == 4
        db.session.rollback()
        assert table_versions.stamps(["series"]) == before
    assert total(client, auth_headers["alice"]) == 3
