"""What the ingest tasks write to the tables: reconciled with the ledger, replaced on rerun,
QC findings with reasons, Data Docs linked from the batch, and no PHI in any column."""

import json
import re

import pyarrow as pa
import pytest
from pydicom import dcmread

from pipeline import batch, intake, ledger, tables
from pipeline.demo import upload_trial
from pipeline.reasons import Reason
from tests.accounting import process
from tests.conftest import phi_leaks


@pytest.fixture
def processed(enrolled, trial):
    expected = upload_trial(enrolled, trial)
    for batch_id in expected:
        process(enrolled, batch_id)
    return expected


def _sorted_rows(home, table):
    data = tables.read_table(home, table)
    return sorted(json.dumps(r, default=str, sort_keys=True) for r in data.to_pylist())


def test_every_batch_has_a_batches_row_that_reconciles_with_the_ledger(processed, enrolled):
    rows = {r["batch_id"]: r for r in tables.read_table(enrolled, "batches").to_pylist()}
    assert set(rows) == set(processed)
    for summary in ledger.batch_summaries(enrolled):
        row = rows[summary["batch_id"]]
        for key in ("state", "files", "archived", "quarantined", "duplicates"):
            assert row[key] == summary[key], key
        assert row["claimed_at"] <= row["finished_at"]
        assert row["processing_seconds"] >= 0
    instances = tables.read_table(enrolled, "instances")
    assert sum(r["archived"] for r in rows.values()) == instances.num_rows
    series = tables.read_table(enrolled, "series")
    assert sum(series.column("instances").to_pylist()) == instances.num_rows


def test_a_batch_refused_before_its_subject_was_confirmed_names_no_subject(processed, enrolled):
    rows = tables.read_table(enrolled, "batches").to_pylist()
    (stranger,) = [r for r in rows if r["reason"] == "unenrolled_subject"]
    assert (stranger["subject_id"], stranger["arm"]) == (None, None)
    assert stranger["archived"] == 0 and stranger["quarantined"] == stranger["files"]


def test_qc_findings_record_quarantined_and_flagged_failures(processed, enrolled, trial):
    findings = tables.read_table(enrolled, "qc_findings").to_pylist()
    planned = trial.batches[1]
    assert {(f["attribute"], f["reason"], f["action"]) for f in findings} == {
        ("SliceThickness", "value_out_of_range", "quarantine"),
        ("ConvolutionKernel", "missing_required_tag", "flag"),
    }
    thick = next(f for f in findings if f["attribute"] == "SliceThickness")
    assert thick["observed"] == "7.0" and thick["modality"] == "CT"
    assert thick["subject_id"] == planned.subject_id and thick["visit"] == planned.visit
    row = next(
        r
        for r in tables.read_table(enrolled, "batches").to_pylist()
        if r["batch_id"] == thick["batch_id"]
    )
    assert (row["quarantined"], row["flagged"]) == (1, 1)
    flagged = [
        f
        for f in ledger.file_rows(enrolled, thick["batch_id"])
        if f["disposition"] == "archived" and f["detail"]
    ]
    summary = Reason.MISSING_REQUIRED_TAG.info.summary
    assert [f["detail"] for f in flagged] == [f"ConvolutionKernel: {summary}"]


def test_the_batch_record_links_its_gx_data_docs(processed, enrolled, trial):
    for batch_id, expect in processed.items():
        record = json.loads(enrolled.batch_record(batch_id).read_text())
        if expect != "done":
            assert record["qc_report"] is None
            continue
        page = enrolled.root / record["qc_report"]
        assert page.is_file() and page.name == "index.html"
        validations = list(page.parent.glob("validations/**/*.html"))
        assert validations, "a validation result page per modality"
        assert (page.parent / "static").resolve() == (enrolled.reports / "qc" / "_static")
    failing = tables.read_table(enrolled, "qc_findings").column("batch_id")[0].as_py()
    html = "".join(p.read_text() for p in enrolled.qc_report(failing).glob("validations/**/*.html"))
    assert "SliceThickness" in html and "ConvolutionKernel" in html


TABLES = ("instances", "series", "batches", "qc_findings")


class Killed(Exception):
    """Stands for a kill -9 at that point: nothing after it runs."""


def test_rerunning_every_task_leaves_identical_rows(enrolled, trial, monkeypatch):
    """Every task re-run in full (as when one is killed after its work, before it records
    that it finished) rewrites identical rows in every table. The batches row's times are
    the ledger's first record of the claim and of the final state, so finalize re-run
    writes the same row, timings included; once finalized, a batch is not run again and
    its row is not rewritten."""
    expected = upload_trial(enrolled, trial)
    batch_id = list(expected)[1]  # the batch with a quarantine and a flag finding
    steps = [s for s in batch.TASKS if s != "finalize"]
    process(enrolled, batch_id, steps)
    first = {t: _sorted_rows(enrolled, t) for t in TABLES}
    for step in steps:
        batch.TASKS[step](enrolled, batch_id)  # each task again, from its input worklist
    assert {t: _sorted_rows(enrolled, t) for t in TABLES} == first
    assert first["batches"] == [] and all(first[t] for t in ("instances", "series"))

    def killed(folder):
        raise Killed

    monkeypatch.setattr(intake, "remove_tree", killed)  # cut off as finalize cleans up
    with pytest.raises(Killed):
        process(enrolled, batch_id, ["finalize"])
    monkeypatch.undo()
    finalized = {t: _sorted_rows(enrolled, t) for t in TABLES}
    (row,) = tables.read_table(enrolled, "batches").to_pylist()
    assert row["claimed_at"] < row["finished_at"] and row["processing_seconds"] > 0
    assert {**finalized, "batches": []} == first  # finalize writes only the batches row
    process(enrolled, batch_id, ["finalize"])  # the retry finds the batch still claimed
    assert not enrolled.claimed_batch(batch_id).exists()
    assert {t: _sorted_rows(enrolled, t) for t in TABLES} == finalized
    (path,) = tables.table_files(enrolled, "batches")
    written = (path.read_bytes(), path.stat().st_mtime_ns)
    process(enrolled, batch_id, list(batch.TASKS))  # the whole batch again: a no-op
    assert (path.read_bytes(), path.stat().st_mtime_ns) == written
    assert {t: _sorted_rows(enrolled, t) for t in TABLES} == finalized


def _table_text(home):
    """Every cell of every table, as text, for a PHI scan."""
    cells = []
    for name in tables.TABLES:
        data = tables.read_table(home, name)
        assert data.schema.names[: len(tables.TABLES[name])] == tables.TABLES[name].names
        for column in data.columns:
            values = column.to_pylist()
            if pa.types.is_list(column.type):
                values = [x for v in values if v for x in v]
            cells += [str(v) for v in values if v is not None]
    return "\n".join(cells)


def test_no_planted_phi_in_any_column_of_any_table(enrolled, trial, protocol):
    # Plant the patient's name in the header attributes the tables read as text, and
    # upload a drop-folder batch whose subject field holds a medical record number.
    first = trial.batches[0]
    patient = trial.patients[first.subject_id]
    ct = sorted((first.folder / "CT").glob("CT2_0*.dcm"))
    for path, keyword in zip(
        ct, ("Manufacturer", "ManufacturerModelName", "BodyPartExamined"), strict=False
    ):
        ds = dcmread(path)
        setattr(ds, keyword, patient.name.replace("^", " "))
        ds.save_as(path)
    expected = upload_trial(enrolled, trial)
    stray = intake.stage_batch(
        enrolled,
        protocol.protocol_id,
        first.site_id,
        patient.patient_id,
        first.visit,
        [first.folder / "MR"],
        check=False,
    )
    for batch_id in [*expected, stray]:
        process(enrolled, batch_id)
    text = _table_text(enrolled).lower()
    assert first.subject_id.lower() in text  # the scan sees the tables' content
    leaks = [
        v
        for v in trial.phi_values()
        if re.search(r"(?<![a-z0-9])" + re.escape(v.lower()) + r"(?![a-z0-9])", text)
    ]
    assert leaks == []
    assert phi_leaks(enrolled.reports, trial.phi_values(), boundary=()) == []
    assert phi_leaks(enrolled.parquet, trial.phi_values(), boundary=()) == []
    # The ledger and batch records too: the stray batch's MRN never became a subject.
    assert phi_leaks(enrolled.root, trial.phi_values()) == []
    reasons = {f["reason"] for f in ledger.file_rows(enrolled) if f["reason"]}
    assert "residual_phi" in reasons  # the planted files were stopped, not archived
