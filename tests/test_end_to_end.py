"""The real thing: `trialpipe run` drives Airflow (SQLite, LocalExecutor, api-server,
scheduler) over generated batches with bad files among them."""

import csv
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline import ledger, tables
from pipeline.demo import upload_trial
from tests.conftest import phi_leaks

TRIALPIPE = str(Path(sys.executable).parent / "trialpipe")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    from pipeline import enrollment
    from pipeline.home import data_home
    from pipeline.protocol import load_protocol
    from pipeline.synth import make_trial
    from tests.conftest import SMALL

    root = tmp_path_factory.mktemp("e2e")
    home = data_home(root / "home").ensure()
    protocol = load_protocol("DEMO-01")
    trial = make_trial(root / "trial", protocol, subjects_per_site=1, shape=SMALL)
    enrollment.import_csv(home, protocol, trial.enrollment_csv)
    expected = upload_trial(home, trial)
    result = subprocess.run(
        [TRIALPIPE, "run", "--timeout", "900"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRIALPIPE_HOME": str(home.root)},
        timeout=1200,
    )
    return home, trial, expected, result


def test_run_exits_zero_when_every_batch_is_terminal(ran):
    _, _, expected, result = ran
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(": success\n") == len(expected), result.stdout[-3000:]
    for batch_id in expected:
        assert f"{batch_id}: success" in result.stdout


def test_one_dag_run_per_batch_with_only_the_batch_id_in_its_conf(ran):
    home, _, expected, _ = ran
    with sqlite3.connect(home.airflow / "airflow.db") as db:
        runs = db.execute(
            "SELECT run_id, state, conf FROM dag_run WHERE dag_id = 'trialpipe_ingest'"
        ).fetchall()
    assert len(runs) == len(expected)
    for run_id, state, conf in runs:
        conf = json.loads(conf)
        assert state == "success"
        assert set(conf) == {"batch_id"} and conf["batch_id"] in expected
        assert run_id.startswith(f"batch__{conf['batch_id']}__")
        # The audit ledger names the DAG run that processed each batch and each file.
        assert ledger.batch_summary(home, conf["batch_id"])["dag_run_id"] == run_id
        assert {f["dag_run_id"] for f in ledger.file_rows(home, conf["batch_id"])} == {run_id}


def test_batches_end_done_or_quarantined_as_expected_and_reconcile(ran):
    home, _, expected, _ = ran
    rows = {r["batch_id"]: r for r in ledger.batch_summaries(home)}
    for batch_id, expect in expected.items():
        row = rows[batch_id]
        assert row["files"] == row["archived"] + row["quarantined"] + row["duplicates"]
        if expect == "done":
            assert row["state"] == "done", row
        else:
            assert (row["state"], row["reason"]) == ("quarantined", expect)


def test_archive_quarantine_and_tables_agree(ran):
    home = ran[0]
    archived = [f for f in ledger.file_rows(home) if f["disposition"] == "archived"]
    on_disk = sorted(home.archive.rglob("*.dcm"))
    assert sorted(home.archive / f["archive_path"] for f in archived) == on_disk
    instances = tables.read_table(home, "instances")
    assert instances.num_rows == len(on_disk)
    reasons = {f["reason"] for f in ledger.file_rows(home) if f["disposition"] == "quarantined"}
    assert {"truncated", "not_dicom", "mixed_patients", "unenrolled_subject"} <= reasons
    for path in on_disk:
        assert path.relative_to(home.archive).parts[1] in ("A", "B")


def test_the_demo_writes_the_arm_report_its_blinded_twin_and_a_summary(ran):
    """`trialpipe demo`'s last step, on this DAG-processed home. It runs before the PHI scan
    below, so that scan searches the reports too."""
    from pipeline import demo
    from pipeline.protocol import load_protocol

    home, trial, expected, _ = ran
    with sqlite3.connect(home.airflow / "airflow.db") as db:
        runs = {
            json.loads(conf)["batch_id"]: state
            for conf, state in db.execute(
                "SELECT conf, state FROM dag_run WHERE dag_id = 'trialpipe_ingest'"
            )
        }
    printed = demo.report(home, load_protocol("DEMO-01"), runs)
    folder = home.reports / "arms" / "DEMO-01"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        stem + suffix
        for stem in ("arms", "arms-blinded")
        for suffix in (".html", "-counts.csv", "-parameters.csv", "-visits.csv")
    )
    assert f"arm report: {folder / 'arms.html'}\n   blinded: {folder / 'arms-blinded.html'}" in (
        printed
    )
    files = ledger.file_rows(home)
    archived = [f for f in files if f["disposition"] == "archived"]
    assert f"DAG runs: {len(expected)} (Counter({{'success': {len(expected)}}}))" in printed
    assert f"files uploaded: {len(files)}; archived {len(archived)}, " in printed
    # The printed comparison and both reports count, per arm, the images the archive holds.
    per_arm = Counter(f["archive_path"].split("/")[1] for f in archived)
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["arm", "visit"])
    columns = lines[header].split()
    end = next(i for i in range(header, len(lines)) if lines[i].startswith("("))
    shown = Counter()
    for line in lines[header + 2 : end]:
        row = dict(zip(columns, line.split(), strict=True))
        shown[row["arm"]] += int(row["images"])
    assert shown == per_arm and set(per_arm) == {"A", "B"}
    for name, groups in (("arms", {"A", "B"}), ("arms-blinded", {"Group 1", "Group 2"})):
        with (folder / f"{name}-counts.csv").open() as handle:
            counts = list(csv.DictReader(handle))
        assert {r["arm"] for r in counts} == groups
        assert sum(int(r["images"]) for r in counts) == len(archived)
    assert phi_leaks(home.reports, trial.phi_values(), boundary=()) == []


def test_no_planted_phi_anywhere_outside_the_boundary_airflow_db_and_logs_included(ran):
    home, trial, _, _ = ran
    logs = list((home.airflow / "logs").rglob("*.log"))
    assert logs, "the task logs must exist to be searched"
    assert (home.airflow / "airflow.db").exists()
    assert phi_leaks(home.root, trial.phi_values()) == []


def test_the_boundary_folders_did_receive_the_phi(ran):
    """The leak scan above must be able to see PHI: quarantine holds refused originals."""
    home, trial, _, _ = ran
    assert phi_leaks(home.root, trial.phi_values(), boundary=("inbox", "restricted"))


def test_the_tables_and_qc_reports_are_there_after_the_dag_runs(ran):
    home, _, expected, _ = ran
    batches = tables.read_table(home, "batches").to_pylist()
    assert sorted(r["batch_id"] for r in batches) == sorted(expected)
    for row in batches:
        if row["state"] == "done":
            assert (home.root / row["qc_report"]).is_file()
    assert tables.read_table(home, "qc_findings").num_rows == 2  # thick slice, no kernel


def test_the_compaction_dag_merges_files_without_changing_any_query_result(ran):
    from pipeline import query

    home = ran[0]
    statements = {
        name: f"SELECT * FROM {name} ORDER BY ALL"
        for name in ("instances", "series", "batches", "qc_findings")
    }
    before = {name: query.run(home, sql).rows for name, sql in statements.items()}
    files_before = len(tables.table_files(home, "instances"))
    result = subprocess.run(
        [TRIALPIPE, "compact", "--timeout", "600"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRIALPIPE_HOME": str(home.root)},
        timeout=900,
    )
    assert result.returncode == 0 and "compaction DAG run: success" in result.stdout, result.stderr[
        -3000:
    ]
    after = {name: query.run(home, sql).rows for name, sql in statements.items()}
    assert after == before
    files = tables.table_files(home, "instances")
    assert len(files) < files_before
    partitions = [f.parent for f in files]
    assert len(partitions) == len(set(partitions))  # one file left per partition
    with sqlite3.connect(home.airflow / "airflow.db") as db:
        (state,) = db.execute(
            "SELECT state FROM dag_run WHERE dag_id = 'trialpipe_compact'"
        ).fetchone()
    assert state == "success"
