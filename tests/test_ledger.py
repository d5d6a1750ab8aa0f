"""The audit ledger: append-only on SQLite and PostgreSQL, a trail for every file."""

import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import text

from pipeline import __version__, db, intake, ledger
from pipeline.cli import main
from pipeline.demo import upload_trial
from pipeline.home import DataHome
from tests.accounting import process
from tests.conftest import fresh_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger(request, enrolled):
    """The enrolled home with its ledger on SQLite (embedded) or on a fresh PostgreSQL
    database (production), created for the test and dropped after."""
    if request.param == "sqlite":
        yield enrolled
        return
    with fresh_postgres() as url:
        yield DataHome(enrolled.root, url)


def _process(home, trial):
    expected = upload_trial(home, trial)
    for batch_id in expected:
        process(home, batch_id, run_id=f"run-of-{batch_id}")
    return expected


def test_every_uploaded_file_has_one_current_disposition(any_ledger, trial):
    expected = _process(any_ledger, trial)
    rows = {r["batch_id"]: r for r in ledger.batch_summaries(any_ledger)}
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


LEDGER_TABLES = ("batches", "batch_events", "file_events", "archive_index")


def _refused_statements(dialect):
    """Every way to change or remove a ledger row: per table an UPDATE, a DELETE of rows,
    and emptying the table at once (PostgreSQL's TRUNCATE, which fires no row trigger;
    SQLite has none, and empties a table by a DELETE without WHERE)."""
    for table in LEDGER_TABLES:
        yield f"UPDATE {table} SET batch_id = 'changed'"
        yield f"DELETE FROM {table} WHERE batch_id IS NOT NULL"
        yield f"TRUNCATE {table}" if dialect == "postgresql" else f"DELETE FROM {table}"


def _row_counts(engine):
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in LEDGER_TABLES}


def test_the_ledger_refuses_every_update_delete_and_truncate(any_ledger, trial):
    planned = trial.batches[2]
    batch_id = intake.stage_batch(
        any_ledger, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    process(any_ledger, batch_id)
    engine = ledger._engine(any_ledger)
    counts = _row_counts(engine)
    assert all(counts.values()), counts  # every table has rows to lose
    before = ledger.trail(any_ledger, batch_id)
    statements = list(_refused_statements(engine.dialect.name))
    assert len(statements) == 3 * len(LEDGER_TABLES)
    for statement in statements:
        with (
            pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"),
            engine.begin() as conn,
        ):
            conn.execute(text(statement))
    assert _row_counts(engine) == counts
    assert ledger.trail(any_ledger, batch_id) == before


def test_a_database_error_never_quotes_the_statement_values(any_ledger):
    """A refused statement's error reaches the task log: it names the statement, never
    the values bound into it (original UIDs, names)."""
    ledger.register_batch(any_ledger, "b1", "DEMO-01", "SITE-01", files=1)
    phi = "DOE^JANE 1.2.826.0.1.3680043.2.1125.1.424242"
    with (
        pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only") as refused,
        ledger._engine(any_ledger).begin() as conn,
    ):
        conn.execute(text("UPDATE batches SET uploader = :who"), {"who": phi})
    assert "UPDATE batches" in str(refused.value) and phi not in str(refused.value)


def test_the_ledger_records_uploader_upload_time_and_versions(any_ledger, trial, protocol):
    planned = trial.batches[2]
    start = dt.datetime.now(dt.UTC)
    batch_id = intake.stage_batch(
        any_ledger,
        "DEMO-01",
        planned.site_id,
        planned.subject_id,
        planned.visit,
        [planned.folder],
        uploader="coordinator-site-03",
    )
    uploaded = dt.datetime.now(dt.UTC)
    process(any_ledger, batch_id, run_id="run-1")
    trail = ledger.trail(any_ledger, batch_id)
    assert trail["batch"]["uploader"] == "coordinator-site-03"
    assert start <= trail["batch"]["uploaded_at"] <= uploaded
    processed = [e for e in trail["events"] if e["state"] != "ready"]
    assert processed and all(e["code_version"] == __version__ for e in processed)
    assert all(e["recipe_version"] == protocol.recipe_version for e in processed)
    assert trail["files"] and all(
        (f["code_version"], f["recipe_version"], f["dag_run_id"])
        == (__version__, protocol.recipe_version, "run-1")
        for f in trail["files"]
    )


def test_batches_reserving_the_same_instances_at_once_agree_on_one_holder_each(any_ledger):
    """Four batches reserve the same 300 instances at the same moment, two in the reverse
    order: no error (no deadlock on PostgreSQL), one holder per instance, the same in
    every answer, and a later batch, or a repeat, is told the same."""
    slots = [ledger.ArchiveSlot(f"2.25.{n}", n, f"{n:064x}", f"a/{n}.dcm") for n in range(300)]
    ledger.batch_summaries(any_ledger)  # the tables exist before the batches race
    start = threading.Barrier(4)

    def reserve(number):
        start.wait()
        mine = slots if number % 2 else slots[::-1]
        return ledger.reserve_archive_slots(any_ledger, f"batch-{number}", mine)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(reserve, range(4)))
    assert len(answers[0]) == len(slots)
    assert all(answer == answers[0] for answer in answers)
    assert {holder.batch_id for holder in answers[0].values()} <= {f"batch-{n}" for n in range(4)}
    assert ledger.reserve_archive_slots(any_ledger, "batch-late", slots) == answers[0]
    first = answers[0]["2.25.0"].batch_id
    assert ledger.reserve_archive_slots(any_ledger, first, slots[:1]) == {
        "2.25.0": answers[0]["2.25.0"]
    }


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


def _starting_at_once(url: str, root: Path) -> None:
    """Six processes open the ledger at ``url`` at once; all must succeed, and the new
    ledger must refuse an update."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRIALPIPE_HOME": str(root), "TRIALPIPE_LEDGER_URL": url}
    script = "from pipeline import ledger; from pipeline.home import data_home; "
    script += "print(ledger.batch_summaries(data_home()))"
    starts = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
        for _ in range(6)
    ]
    failures = [p.stderr.read() for p in starts if p.wait(timeout=120) != 0]
    assert failures == []
    home = DataHome(root, url)
    ledger.register_batch(home, "b1", "DEMO-01", "SITE-01", files=1)
    engine = sqlalchemy.create_engine(url)
    with (
        engine.connect() as conn,
        pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"),
    ):
        conn.execute(text("UPDATE batches SET files = 2"))
    engine.dispose()
    db.engine(url).dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_processes_starting_on_a_new_ledger_at_once_all_find_it_ready(tmp_path, database):
    """The first tasks of a new deployment start together: each sees the tables missing
    and creates them; every one must go on, with the append-only triggers in place."""
    root = tmp_path / "home"
    if database == "sqlite":
        _starting_at_once(f"sqlite:///{root / 'ledger.sqlite'}", root)
        return
    with fresh_postgres() as url:
        _starting_at_once(url, root)
