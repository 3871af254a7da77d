"""flask register-case: the same rules as POST /api/cases."""
import pytest

from models import CaseTag, ClinicalCase, db
from tests.case_helpers import UID1, UID2, UID_OTHER_DOMAIN, persona, seed_series
from tests.factories import make_project


@pytest.fixture
def runner(app, tokens):
    seed_series(app)
    return app.test_cli_runner()


def run(runner, *args):
    return runner.invoke(args=["register-case", *args])


def test_register_case_by_project_name_and_login(app, runner, default_project):
    result = run(runner, "default", "--user=bob", "--tags=a, b", UID1, f"{UID2}:8:1:-1")
    assert result.exit_code == 1  # 8..1 is not inside "1-5,8-9": same rule as the API
    assert "Specified range is invalid." in result.output
    result = run(runner, "default", "--user=bob@example.com", "--tags=a, b", UID1,
                 f"{UID2}:9:1:-4")
    assert result.exit_code == 0, result.output
    case_id = result.output.strip().splitlines()[-1]
    with app.app_context():
        case = db.session.get(ClinicalCase, case_id)
        assert case.project_id == default_project
        assert case.tags == ["a", "b"]
        assert set(db.session.execute(db.select(CaseTag.tag).where(
            CaseTag.case_id == case_id)).scalars()) == {"a", "b"}
        (rev,) = [case.latest_revision]
        assert rev["creator"] == "bob@example.com"
        assert [s["partialVolumeDescriptor"] for s in rev["series"]] == [
            {"start": 1, "end": 10, "delta": 1}, {"start": 9, "end": 1, "delta": -4}]


def test_without_descriptor_the_first_run_is_used(app, runner, default_project):
    result = run(runner, default_project, "--user=alice", UID2)
    assert result.exit_code == 0, result.output
    case_id = result.output.strip()
    with app.app_context():
        rev = db.session.get(ClinicalCase, case_id).latest_revision
        assert rev["series"][0]["partialVolumeDescriptor"] == {"start": 1, "end": 5, "delta": 1}
        assert db.session.get(ClinicalCase, case_id).tags == []


@pytest.mark.parametrize("args, message", [
    (["nope", "--user=bob", UID1], "The requested project was not found."),
    (["default", "--user=nobody", UID1], "No user with e-mail or login ID 'nobody'."),
    (["default", "--user=guest", UID1], 'You do not have "write" privilege of this project.'),
    (["default", "--user=bob", UID_OTHER_DOMAIN],
     "You do not have privilege to access this series."),
    (["default", "--user=bob", "1.2.3.404"], "The requested series was not found."),
    (["default", "--user=bob", f"{UID1}:1:x:1"], "Invalid partial volume descriptor"),
    (["default", "--user=bob", f"{UID1}:1:10:0"], "Invalid partial volume descriptor"),
    (["default", "--user=bob", "--tags=" + "x" * 33, UID1], "Tag length is too large"),
])
def test_register_case_refusals(app, runner, args, message):
    result = run(runner, *args)
    assert result.exit_code != 0
    assert message in result.output
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(ClinicalCase.case_id))).scalar() == 0


def test_series_of_two_domains_are_refused(app, runner, default_project):
    persona(app, "carol@example.com", domains=["default", "sirius"],
            read_projects=[default_project], write_projects=[default_project])
    result = run(runner, "default", "--user=carol", UID1, UID_OTHER_DOMAIN)
    assert result.exit_code != 0
    assert "All series must belong to the same domain." in result.output


def test_user_and_series_are_required(runner):
    assert run(runner, "default", UID1).exit_code != 0
    assert run(runner, "default", "--user=bob").exit_code != 0


def test_project_id_wins_over_a_name(app, runner):
    with app.app_context():
        project = make_project("another")
        db.session.commit()
        pid = project.project_id
    result = run(runner, pid, "--user=alice", UID1)
    # alice has no role on the new project: refused by the write check, not "not found".
    assert result.exit_code != 0
    assert 'You do not have "write" privilege of this project.' in result.output
