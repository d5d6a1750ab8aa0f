"""The CLI as other tools drive it: exit codes, messages, JSON."""

import json
import re
from pathlib import Path

import pytest

from pipeline import ledger
from pipeline.cli import main
from tests.accounting import process


def run(capsys, home, *args):
    code = main(["--home", str(home.root), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_enroll_then_reenroll_reports_no_change(capsys, home, trial):
    code, out, _ = run(capsys, home, "enroll", "--protocol", "DEMO-01", str(trial.enrollment_csv))
    assert code == 0 and "enrolled 3 new" in out
    code, out, _ = run(capsys, home, "enroll", "--protocol", "DEMO-01", str(trial.enrollment_csv))
    assert code == 0 and "enrolled 0 new subject(s); 3 already enrolled" in out


def test_an_arm_change_is_refused_with_a_nonzero_exit(capsys, home, trial, tmp_path):
    run(capsys, home, "enroll", "--protocol", "DEMO-01", str(trial.enrollment_csv))
    text = trial.enrollment_csv.read_text().replace(",A,", ",X,", 1).replace(",X,", ",B,")
    changed = tmp_path / "changed.csv"
    changed.write_text(text)
    code, _, err = run(capsys, home, "enroll", "--protocol", "DEMO-01", str(changed))
    assert code == 2 and "cannot change" in err and "Traceback" not in err


def test_upload_prints_the_batch_id_and_status_lists_it(capsys, enrolled, trial):
    planned = trial.batches[1]
    code, out, _ = run(
        capsys,
        enrolled,
        "upload",
        "--protocol",
        "DEMO-01",
        "--site",
        planned.site_id,
        "--subject",
        planned.subject_id,
        "--visit",
        planned.visit,
        str(planned.folder),
    )
    batch_id = out.strip()
    assert code == 0 and re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", batch_id)
    assert planned.subject_id not in batch_id  # nothing typed at the site becomes an ID
    code, out, _ = run(capsys, enrolled, "status", "--json")
    (row,) = json.loads(out)
    assert row == {
        "batch_id": batch_id,
        "site_id": planned.site_id,
        "subject_id": planned.subject_id,
        "visit": planned.visit,
        "state": "ready",
        "files": 6,
        "archived": 0,
        "quarantined": 0,
        "duplicates": 0,
    }
    code, out, _ = run(capsys, enrolled, "status")
    assert out.splitlines()[0].split() == [
        "batch_id",
        "site_id",
        "subject_id",
        "visit",
        "state",
        "files",
        "archived",
        "quarantined",
        "duplicates",
    ]


@pytest.mark.parametrize(
    ("site", "visit", "subject", "message"),
    [
        ("SITE-09", "BASELINE", None, "not a site of DEMO-01"),
        ("SITE-01", "DAY1", None, "not a visit of DEMO-01"),
        ("SITE-01", "BASELINE", "DEMO-01-77777", "not enrolled"),
    ],
)
def test_upload_refusals_are_clear_and_nonzero(
    capsys, enrolled, trial, site, visit, subject, message
):
    planned = trial.batches[0]
    code, out, err = run(
        capsys,
        enrolled,
        "upload",
        "--protocol",
        "DEMO-01",
        "--site",
        site,
        "--subject",
        subject or planned.subject_id,
        "--visit",
        visit,
        str(planned.folder),
    )
    assert code == 2 and out == "" and message in err and "Traceback" not in err
    assert ledger.batch_summaries(enrolled) == []


def test_run_with_nothing_ready_says_so(capsys, home):
    code, out, _ = run(capsys, home, "run")
    assert code == 0 and "no READY batches" in out


def test_run_refuses_an_ingest_setting_that_is_no_number_and_leaves_the_batch_ready(
    capsys, enrolled, trial, monkeypatch
):
    from pipeline.intake import ready_batches

    planned = trial.batches[1]
    where = ["--site", planned.site_id, "--subject", planned.subject_id, "--visit", planned.visit]
    code, out, _ = run(
        capsys, enrolled, "upload", "--protocol", "DEMO-01", *where, str(planned.folder)
    )
    assert code == 0
    monkeypatch.setenv("TRIALPIPE_INGEST_SLOTS", "0")
    code, _, err = run(capsys, enrolled, "run")
    assert code == 2 and "Traceback" not in err
    assert "TRIALPIPE_INGEST_SLOTS must be a whole number of at least 1, not '0'" in err
    assert [b.batch_id for b in ready_batches(enrolled)] == [out.strip()]


def test_deid_dry_run_writes_deidentified_files_and_a_report_and_no_archive(
    capsys, enrolled, trial, tmp_path
):
    planned = trial.batches[0]
    out_dir = tmp_path / "out"
    inputs = {p: p.read_bytes() for p in planned.folder.rglob("*") if p.is_file()}
    code, _, _ = run(
        capsys,
        enrolled,
        "deid",
        "--protocol",
        "DEMO-01",
        "--site",
        planned.site_id,
        "--subject",
        planned.subject_id,
        "--visit",
        planned.visit,
        str(planned.folder),
        str(out_dir),
    )
    assert code == 0
    report = json.loads((out_dir / "deid-report.json").read_text())
    reasons = {f["path"].split("/")[-1]: f["reason"] for f in report["files"] if f["reason"]}
    assert reasons == planned.bad_files
    written = sorted(out_dir.rglob("*.dcm"))
    assert len(written) == len(report["files"]) - len(planned.bad_files)
    assert list(enrolled.archive.rglob("*")) == []
    assert ledger.batch_summaries(enrolled) == []
    assert not (enrolled.restricted / "dry-runs").exists() or not any(
        (enrolled.restricted / "dry-runs").iterdir()
    )
    import pydicom

    sample = pydicom.dcmread(written[0])
    assert sample.PatientIdentityRemoved == "YES" and sample.PatientID == planned.subject_id
    actions = next(f["actions"] for f in report["files"] if f["actions"])
    assert "PatientAddress" in actions["removed"] and "StudyInstanceUID" in actions["replaced"]
    assert "PatientIdentityRemoved" in actions["added"] and "Modality" in actions["kept"]
    assert "PixelData" in actions["kept"]
    # The sandbox hard-links the inputs: they come out as they went in, linked nowhere.
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert all(p.stat().st_nlink == 1 for p in inputs)
    text = (out_dir / "deid-report.json").read_text()
    assert trial.patients[planned.subject_id].patient_id not in text  # names, never values


def test_deid_dry_run_refuses_an_unenrolled_subject(capsys, enrolled, trial, tmp_path):
    code, _, err = run(
        capsys,
        enrolled,
        "deid",
        "--protocol",
        "DEMO-01",
        "--site",
        "SITE-01",
        "--subject",
        "NOBODY",
        "--visit",
        "BASELINE",
        str(trial.batches[0].folder),
        str(tmp_path / "o"),
    )
    assert code == 2 and "not enrolled" in err


def test_the_crosswalk_exports_old_and_new_ids_for_a_reviewer(capsys, enrolled, trial, tmp_path):
    from pipeline import intake

    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    process(enrolled, batch_id)
    target = tmp_path / "crosswalk.csv"
    code, _, _ = run(capsys, enrolled, "crosswalk", "export", "--protocol", "DEMO-01", str(target))
    lines = target.read_text().splitlines()
    assert code == 0 and lines[0] == "id_old,id_new"
    pairs = dict(line.split(",") for line in lines[1:])
    patient = trial.patients[planned.subject_id]
    assert pairs[patient.patient_id] == planned.subject_id
    assert sum(new.startswith("2.25.") for new in pairs.values()) >= 6 + 2 + 2
    assert target.stat().st_mode & 0o077 == 0


def _process_all(home, trial):
    from pipeline.demo import upload_trial

    for batch_id in upload_trial(home, trial):
        process(home, batch_id)


def test_query_prints_a_table_csv_or_json_and_refuses_bad_sql(capsys, enrolled, trial):
    _process_all(enrolled, trial)
    sql = "SELECT site, count(*) AS n FROM instances GROUP BY site ORDER BY site"
    code, out, _ = run(capsys, enrolled, "query", sql)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["site", "n"] and lines[-1] == "(3 rows)"
    code, out, _ = run(capsys, enrolled, "query", "--format", "csv", sql)
    assert out.splitlines()[0] == "site,n" and out.splitlines()[1].startswith("SITE-01,")
    code, out, _ = run(capsys, enrolled, "query", "--format", "json", sql)
    assert [r["site"] for r in json.loads(out)] == ["SITE-01", "SITE-02", "SITE-03"]
    code, _, err = run(capsys, enrolled, "query", "SELECT nope FROM instances")
    assert code == 2 and "query failed" in err and "nope" in err and "Traceback" not in err


def test_report_arms_writes_the_html_and_csv_files(capsys, enrolled, trial):
    _process_all(enrolled, trial)
    code, out, _ = run(capsys, enrolled, "report", "arms", "--blinded", "--as-of", "2026-11-25")
    assert code == 0
    paths = [line.split(": ", 1)[1] for line in out.splitlines()]
    assert paths[0].endswith("reports/arms/DEMO-01/arms-blinded.html")
    assert all(Path(p).is_file() for p in paths) and len(paths) == 4
