"""The audit ledger: append-only on SQLite and PostgreSQL, a trail for every file."""

import json
import uuid

import pytest
import sqlalchemy
from sqlalchemy import text

from pipeline import batch, ledger
from pipeline.cli import main
from pipeline.demo import upload_trial
from pipeline.home import DataHome

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger(request, enrolled):
    """The enrolled home with its ledger on SQLite (embedded) or on a fresh PostgreSQL
    database (production), created for the test and dropped after."""
    if request.param == "sqlite":
        yield enrolled
        return
    name = f"trialpipe_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield DataHome(enrolled.root, f"{POSTGRES}/{name}")
    finally:
        from pipeline import db

        db.engine(f"{POSTGRES}/{name}").dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _process(home, trial):
    expected = upload_trial(home, trial)
    for batch_id in expected:
        for step in batch.TASKS:
            batch.run_task(step, batch_id, home, run_id=f"run-of-{batch_id}")
    return expected


def test_every_uploaded_file_has_one_current_disposition(any_ledger, trial):
    expected = _process(any_ledger, trial)
    rows = {r["batch_id"]: r for r in ledger.batch_rows(any_ledger)}
    assert set(rows) == set(expected)
    for batch_id, row in rows.items():
        files = ledger.file_rows(any_ledger, batch_id)
        assert (
            row["files"] == len(files) == row["archived"] + row["quarantined"] + row["duplicates"]
        )
        assert all(f["sha256_in"] for f in files if f["reason"] != "checksum_mismatch")
        assert all(f["dag_run_id"] == f"run-of-{batch_id}" for f in files)
        for f in files:
            if f["disposition"] == "archived":
                assert f["sha256_out"] and f["archive_path"] and f["recipe_version"]


@pytest.mark.parametrize(
    "statement", ["UPDATE file_events SET reason = 'x'", "DELETE FROM batches"]
)
def test_the_ledger_refuses_updates_and_deletes(any_ledger, trial, statement):
    _process(any_ledger, trial)
    engine = ledger._engine(any_ledger)
    with pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text(statement))
    assert ledger.file_rows(any_ledger)  # nothing was changed


def test_a_retried_finalize_appends_nothing(enrolled, trial):
    expected = _process(enrolled, trial)
    batch_id = next(iter(expected))
    before = ledger.trail(enrolled, batch_id)
    records = [
        ledger.FileRecord(
            f["file_no"],
            f["sha256_in"],
            f["size"],
            ledger.Disposition(f["disposition"]),
            f["reason"],
            f["detail"],
            f["sha256_out"],
            f["archive_path"],
        )
        for f in ledger.file_rows(enrolled, batch_id)
    ]
    assert ledger.record_files(enrolled, batch_id, records) == 0
    ledger.set_state(
        enrolled,
        batch_id,
        ledger.BatchState(before["batch"]["state"]),
        None,
        reason=before["batch"]["reason"],
    )
    assert ledger.trail(enrolled, batch_id) == before


def test_audit_prints_the_trail_of_a_batch(capsys, enrolled, trial):
    expected = _process(enrolled, trial)
    batch_id = next(b for b, e in expected.items() if e == "done")
    assert main(["--home", str(enrolled.root), "audit", batch_id]) == 0
    out = capsys.readouterr().out
    assert f"batch {batch_id}" in out
    for state in ("ready", "processing", "done"):
        assert f" {state} " in out
    files = ledger.file_rows(enrolled, batch_id)
    for f in files:
        assert f"#{f['file_no']:<4}" in out and f["sha256_in"] in out
    assert f"run-of-{batch_id}" in out and "truncated" in out
    assert main(["--home", str(enrolled.root), "audit", batch_id, "--json"]) == 0
    trail = json.loads(capsys.readouterr().out)
    assert [e["state"] for e in trail["events"]] == ["ready", "processing", "done"]
    assert main(["--home", str(enrolled.root), "audit", "nope"]) == 2
    assert "no batch nope" in capsys.readouterr().err
