"""Series commands of cli.py: import-series, dump-dicom, refresh-series-parameters."""
import json
import shutil
import tarfile

import pytest
import sqlalchemy as sa

from models import Series, db
from tests.dicom_factory import dicom_bytes, write_dicom

HEAD_FIRST = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.547"
FOOT_FIRST = "1.2.276.0.7230010.3.1.3.3289186935.22648.1590026998.548"


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def rows(app):
    with app.app_context():
        return {s.series_uid: (s.images, s.domain)
                for s in db.session.execute(sa.select(Series)).scalars()}


def test_import_series_folders_archives_and_junk(app, runner, dicom_dir, tmp_path):
    shutil.copytree(dicom_dir / "head-first", tmp_path / "in" / "sub" / "head")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    with tarfile.open(tmp_path / "in" / "foot.tar.gz", "w:gz") as archive:
        archive.add(dicom_dir / "foot-first", arcname="foot")
    result = runner.invoke(args=["import-series", "--domain", "default", "-r",
                                 str(tmp_path / "in")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "20 files imported into 2 series, 1 skipped"
    assert rows(app) == {HEAD_FIRST: ("1-10", "default"), FOOT_FIRST: ("1-10", "default")}


def test_import_series_without_recursion_skips_sub_folders(app, runner, dicom_dir, tmp_path):
    shutil.copytree(dicom_dir / "head-first", tmp_path / "in" / "sub")
    shutil.copy(dicom_dir / "foot-first" / "foot-first001.dcm", tmp_path / "in")
    result = runner.invoke(args=["import-series", "-d", "default", str(tmp_path / "in")])
    assert result.output.strip().splitlines()[-1] == "1 files imported into 1 series, 0 skipped"
    assert rows(app) == {FOOT_FIRST: ("1", "default")}


def test_import_series_refuses_unknown_domain(app, runner, dicom_dir):
    result = runner.invoke(args=["import-series", "-d", "nowhere", str(dicom_dir / "head-first")])
    assert result.exit_code != 0 and 'The domain "nowhere"' in result.output
    assert rows(app) == {}


def test_import_series_reports_a_broken_file(app, runner, tmp_path):
    write_dicom(str(tmp_path / "1.dcm"), series_uid="1.2.3.50", instance=1)
    (tmp_path / "2.dcm").write_bytes(dicom_bytes(series_uid="1.2.3.50", instance=2)[:300])
    result = runner.invoke(args=["import-series", "-d", "default", str(tmp_path)])
    assert result.exit_code == 1
    assert "Error while processing file #2, entity #2: " in result.output
    assert "(after 1 imported)" in result.output
    assert rows(app) == {"1.2.3.50": ("1", "default")}


def test_dump_dicom(runner, dicom_dir):
    result = runner.invoke(args=["dump-dicom", str(dicom_dir / "misc" / "CT-phantom-lossless.dcm")])
    assert result.exit_code == 0
    doc = json.loads(result.output)
    assert doc["seriesUid"] == "1.2.840.113619.2.55.1.1762528103.1926.1149118792.373"
    assert doc["instanceNumber"] == 73 and doc["modality"] == "CT"
    assert doc["seriesDate"] == "2006-06-01T17:25:46.000Z"
    assert doc["parameters"]["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.70"


def test_dump_dicom_of_a_broken_file(runner, tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not dicom")
    result = runner.invoke(args=["dump-dicom", str(path)])
    assert result.exit_code == 1 and "not a DICOM file" in result.output


def test_refresh_series_parameters(app, runner, dicom_dir):
    assert runner.invoke(args=["import-series", "-d", "default",
                               str(dicom_dir / "head-first")]).exit_code == 0
    with app.app_context():
        before = db.session.get(Series, HEAD_FIRST).updated_at
        db.session.execute(sa.update(Series).values(parameters={"old": 1}, updated_at=before))
        db.session.commit()
    result = runner.invoke(args=["refresh-series-parameters", "--max-date", "2000-01-01T00:00:00Z"])
    assert result.output.strip() == "Refreshed 0 series, 0 failed."
    result = runner.invoke(args=["refresh-series-parameters"])
    assert result.output.strip() == "Refreshed 1 series, 0 failed."
    with app.app_context():
        series = db.session.get(Series, HEAD_FIRST)
        assert "old" not in series.parameters and series.parameters["SliceThickness"] == 6
        assert series.updated_at == before
    assert runner.invoke(args=["refresh-series-parameters", "--max-date", "x"]).exit_code != 0
