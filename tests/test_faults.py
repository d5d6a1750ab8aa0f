"""Fault injection: kill -9 at a kill point of every task and of `trialpipe run`, a disk
that fills up (for real, on a tiny tmpfs), a corrupt file among 200, the same batch uploaded
twice, two runs at once. Each ends with every uploaded file archived, quarantined or
recorded as a duplicate, no archive file twice, and one Parquet row per archived file."""

import contextlib
import datetime as dt
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.exc import DBAPIError

from pipeline import batch, db, enrollment, ledger
from pipeline.home import DataHome, data_home
from pipeline.synth import SeriesShape, make_series, write_series
from tests.accounting import assert_accounted, process, stage, temporary_files, upload

TRIALPIPE = str(Path(sys.executable).parent / "trialpipe")


@pytest.fixture
def staged(enrolled, trial):
    """The synthetic trial uploaded: the data home and how many files went in."""
    return enrolled, sum(upload(enrolled, trial).values())


def _start_run(home, faults=None):
    env = {**os.environ, "TRIALPIPE_HOME": str(home.root)}
    if faults:
        env["TRIALPIPE_FAULTS"] = str(faults)
    return subprocess.Popen(
        [TRIALPIPE, "run", "--timeout", "600"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until(condition, process, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached {what}")
        time.sleep(0.2)


def _wait_for(path, process, timeout=300):
    _until(path.exists, process, path.name, timeout)
    time.sleep(0.2)  # the PID is written before the pause begins
    return int(path.read_text())


def _arm(tmp_path, *points):
    faults = tmp_path / "faults"
    faults.mkdir()
    for point in points:
        (faults / point).touch()
    return faults


def _retried_tasks(home):
    with sqlite3.connect(home.airflow / "airflow.db") as airflow_db:
        return {
            task
            for task, tries in airflow_db.execute(
                "SELECT task_id, max(try_number) FROM task_instance GROUP BY task_id"
            )
            if tries > 1
        }


def test_kill_9_of_a_task_at_every_step_is_retried_and_every_file_accounted_for(staged, tmp_path):
    """One run, one kill point per task (claim mid-numbering, deidentify and verify
    mid-batch, validate after reserving archive slots, write_tables between tables, route
    mid-archive, finalize before the ledger): each task process is killed there, Airflow
    retries it, and the retry finishes the batch."""
    home, uploaded = staged
    points = list(batch.TASKS)
    faults = _arm(tmp_path, *points)
    run = _start_run(home, faults)
    for point in points:
        os.kill(_wait_for(faults / f"{point}.pid", run), signal.SIGKILL)
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    assert_accounted(home, uploaded)
    assert set(points) <= _retried_tasks(home)


def test_kill_9_of_trialpipe_run_then_a_rerun_accounts_for_every_file(staged, tmp_path):
    home, uploaded = staged
    faults = _arm(tmp_path, "route")
    run = _start_run(home, faults)
    _wait_for(faults / "route.pid", run)
    run.kill()  # SIGKILL: no cleanup of any kind
    run.wait(60)
    assert any(home.claimed.iterdir())  # a batch was cut off mid-routing
    rerun = _start_run(home)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    assert_accounted(home, uploaded)


def test_the_same_batch_uploaded_twice_before_one_run_is_archived_once(enrolled, trial, tmp_path):
    """Both uploads are processed at once; the first to decide holds its batch at the
    validate kill point until the other has decided and finished, the order in which two
    batches without a shared decision would both archive."""
    planned = trial.batches[1]
    staged = [stage(enrolled, planned) for _ in range(2)]
    faults = _arm(tmp_path, "validate")
    run = _start_run(enrolled, faults)
    _wait_for(faults / "validate.pid", run)
    _until(
        lambda: any(enrolled.batch_record(batch_id).exists() for batch_id, _ in staged),
        run,
        "the other batch finalized",
    )
    (faults / "validate.go").touch()
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    rows = sorted(
        (ledger.batch_summary(enrolled, batch_id) for batch_id, _ in staged),
        key=lambda row: row["archived"],
    )
    assert rows[0]["archived"] == 0 and rows[0]["duplicates"] == rows[1]["archived"] > 0
    assert_accounted(enrolled, sum(files for _, files in staged))


def test_two_runs_at_once_process_each_batch_once(staged):
    home, uploaded = staged
    runs = [_start_run(home) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert any("waiting" in err for _, err in outputs)
    assert_accounted(home, uploaded)
    with sqlite3.connect(home.airflow / "airflow.db") as airflow_db:
        per_batch = airflow_db.execute(
            "SELECT json_extract(conf, '$.batch_id'), count(*) FROM dag_run"
            " WHERE dag_id = 'trialpipe_ingest' GROUP BY 1"
        ).fetchall()
    assert per_batch and all(count == 1 for _, count in per_batch)


@contextlib.contextmanager
def _tiny_disk(folder, size):
    """A tmpfs of ``size`` mounted at ``folder`` (root only, as in CI), unmounted after."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        # Lazily: the databases' pooled connections may still hold files open there.
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@contextlib.contextmanager
def _filled(disk):
    """The disk full to the last byte (a ballast file), then freed again."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0")
    try:
        yield
    finally:
        ballast.unlink()


def test_a_full_disk_fails_each_task_cleanly_and_the_retry_completes_once_space_is_freed(
    protocol, trial, tmp_path, monkeypatch
):
    """The data home, and the archive apart from it, each on a tiny filesystem. Before
    every task the disk it writes to is filled for real: the task fails with DiskFull,
    which names neither a path nor a value; once space is freed the retry completes."""
    with (
        _tiny_disk(tmp_path / "home-disk", "64m") as home_disk,
        _tiny_disk(tmp_path / "archive-disk", "8m") as archive_disk,
    ):
        monkeypatch.setenv("TRIALPIPE_ARCHIVE_URL", str(archive_disk / "archive"))
        home = data_home(home_disk / "home").ensure()
        try:
            enrollment.import_csv(home, protocol, trial.enrollment_csv)
            batch_id, uploaded = stage(home, trial.batches[0])  # with files to quarantine
            for step in batch.TASKS:
                with _filled(archive_disk if step == "route" else home_disk):
                    with pytest.raises(batch.DiskFull) as failure:
                        batch.run_task(step, batch_id, home)
                    real = failure.value.__context__
                    assert batch._disk_full(real), step  # a write really found no space
                    assert not temporary_files(home), step
                message = str(failure.value)
                assert "no space left" in message and step in message
                for value in (str(tmp_path), *trial.phi_values()):
                    assert value not in message
                batch.run_task(step, batch_id, home)
            assert_accounted(home, uploaded)
        finally:
            for url in (home.ledger_url, home.restricted_url):
                db.engine(url).dispose()


def test_a_corrupt_file_in_a_batch_of_200_is_quarantined_and_199_archived(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    patient = trial.patients[planned.subject_id]
    rng = random.Random(3)
    folder = tmp_path / "big"
    paths = write_series(
        make_series(
            patient,
            "CT",
            trial.randomization[planned.subject_id] + dt.timedelta(days=1),
            generate_uid(),
            f"{patient.accession_prefix}Z",
            SeriesShape(rows=16, columns=16, slices=200),
            rng,
        ),
        folder,
        "CT",
    )
    data = paths[117].read_bytes()
    paths[117].write_bytes(data[: len(data) // 3])
    batch_id, uploaded = stage(enrolled, planned, [folder])
    process(enrolled, batch_id)
    row = ledger.batch_summary(enrolled, batch_id)
    reasons = {f["reason"] for f in ledger.file_rows(enrolled, batch_id)}
    assert (row["archived"], row["quarantined"], row["state"]) == (199, 1, "done"), reasons
    (bad,) = [f for f in ledger.file_rows(enrolled, batch_id) if f["reason"]]
    assert bad["reason"] == "truncated"
    assert uploaded == 200
    assert_accounted(enrolled, uploaded)


def test_a_full_disk_under_the_ledger_fails_the_task_as_disk_full_and_the_retry_completes(
    enrolled, trial, tmp_path
):
    """SQLite reports a full disk as its own error, whose text may quote the statement's
    values: the task says DiskFull instead, as for any other write."""
    with _tiny_disk(tmp_path / "ledger-disk", "1m") as disk:
        home = DataHome(enrolled.root, f"sqlite:///{disk / 'ledger.sqlite'}")
        try:
            batch_id, uploaded = stage(home, trial.batches[0])
            steps = list(batch.TASKS)
            for step in steps[:-1]:
                batch.run_task(step, batch_id, home)
            with _filled(disk):
                with pytest.raises(batch.DiskFull) as failure:
                    batch.run_task("finalize", batch_id, home)
                assert isinstance(failure.value.__context__, DBAPIError)
                assert batch._disk_full(failure.value.__context__)
            batch.run_task("finalize", batch_id, home)
            assert_accounted(home, uploaded)
        finally:
            db.engine(home.ledger_url).dispose()
