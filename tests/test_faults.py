"""Fault injection: kill -9 mid-task and of `trialpipe run`, disk full, a corrupt file among
200, two runs at once. Each ends with every uploaded file archived, quarantined or recorded
as a duplicate, no archive file twice, and one Parquet row per archived file."""

import datetime as dt
import errno
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

from pipeline import batch, intake, ledger, tables
from pipeline.demo import upload_trial
from pipeline.synth import SeriesShape, make_series, write_series

TRIALPIPE = str(Path(sys.executable).parent / "trialpipe")


def assert_accounted(home, uploaded):
    """uploaded = archived + quarantined + duplicates; no duplicate archive files; Parquet
    rows = archived files; nothing left half-done."""
    files = ledger.file_rows(home)
    assert len(files) == uploaded
    assert {f["disposition"] for f in files} <= {"archived", "quarantined", "duplicate"}
    archived = [f for f in files if f["disposition"] == "archived"]
    on_disk = sorted(home.archive.rglob("*.dcm"))
    assert sorted(home.archive / f["archive_path"] for f in archived) == on_disk
    assert len({f["archive_path"] for f in archived}) == len(archived)
    assert tables.read_table(home, "instances").num_rows == len(archived)
    assert not any(home.claimed.iterdir()), "a batch was left claimed"
    assert not [p for p in home.root.rglob("*.tmp")], "a temporary file was left behind"
    assert all(b["state"] in ("done", "quarantined") for b in ledger.batch_rows(home))


def _uploaded(trial_or_expected, home):
    return sum(b["files"] for b in ledger.batch_rows(home))


@pytest.fixture
def staged(enrolled, trial):
    upload_trial(enrolled, trial)
    return enrolled


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


def _wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path.name}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached {path.name}")
        time.sleep(0.2)
    time.sleep(0.2)  # the PID is written before the pause begins
    return int(path.read_text())


def _arm(tmp_path, *points):
    faults = tmp_path / "faults"
    faults.mkdir()
    for point in points:
        (faults / point).touch()
    return faults


def test_kill_9_of_a_task_in_deidentification_and_in_routing_is_retried(staged, tmp_path):
    faults = _arm(tmp_path, "deidentify", "route")
    run = _start_run(staged, faults)
    for point in ("deidentify", "route"):
        os.kill(_wait_for(faults / f"{point}.pid", run), signal.SIGKILL)
    _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    assert_accounted(staged, _uploaded(None, staged))
    with sqlite3.connect(staged.airflow / "airflow.db") as db:
        retried = {
            task
            for task, tries in db.execute(
                "SELECT task_id, max(try_number) FROM task_instance GROUP BY task_id"
            )
            if tries > 1
        }
    assert {"deidentify", "route"} <= retried


def test_kill_9_of_trialpipe_run_then_a_rerun_accounts_for_every_file(staged, tmp_path):
    faults = _arm(tmp_path, "route")
    run = _start_run(staged, faults)
    _wait_for(faults / "route.pid", run)
    run.kill()  # SIGKILL: no cleanup of any kind
    run.wait(60)
    assert any(staged.claimed.iterdir())  # a batch was cut off mid-routing
    rerun = _start_run(staged)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    assert_accounted(staged, _uploaded(None, staged))


def test_two_runs_at_once_process_each_batch_once(staged):
    runs = [_start_run(staged) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert any("waiting" in err for _, err in outputs)
    assert_accounted(staged, _uploaded(None, staged))
    with sqlite3.connect(staged.airflow / "airflow.db") as db:
        per_batch = db.execute(
            "SELECT json_extract(conf, '$.batch_id'), count(*) FROM dag_run"
            " WHERE dag_id = 'trialpipe_ingest' GROUP BY 1"
        ).fetchall()
    assert per_batch and all(count == 1 for _, count in per_batch)


def _disk_full_on_the_third(real):
    calls = []

    def fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return fails


def _half_then_full(real):
    """Writes half the file, then the disk is full (as a real write() fails mid-file)."""
    calls = []

    def fails(ds, path):
        calls.append(path)
        real(ds, path)
        if len(calls) == 3:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return fails


@pytest.mark.parametrize(
    ("step", "target", "fault"),
    [
        ("deidentify", (batch, "write_dicom"), _half_then_full),  # writing a staged file
        ("route", (os, "link"), _disk_full_on_the_third),  # linking into the archive
        ("write_tables", (os, "fsync"), _disk_full_on_the_third),  # a Parquet file
    ],
)
def test_disk_full_fails_the_task_cleanly_and_the_retry_completes(
    enrolled, trial, monkeypatch, step, target, fault
):
    expected = upload_trial(enrolled, trial)
    batch_id = next(b for b, e in expected.items() if e == "done")
    steps = list(batch.TASKS)
    for earlier in steps[: steps.index(step)]:
        batch.run_task(earlier, batch_id, enrolled)
    module, name = target
    monkeypatch.setattr(module, name, fault(getattr(module, name)))
    with pytest.raises(batch.DiskFull) as failure:
        batch.run_task(step, batch_id, enrolled)
    monkeypatch.undo()  # space freed; Airflow retries the task
    assert str(enrolled.root) not in str(failure.value) and "no space left" in str(failure.value)
    assert not [p for p in enrolled.root.rglob("*.tmp")]
    for later in steps[steps.index(step) :]:
        batch.run_task(later, batch_id, enrolled)
    for other in expected:
        for each in steps:
            batch.run_task(each, other, enrolled)
    assert_accounted(enrolled, _uploaded(None, enrolled))


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
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [folder]
    )
    for step in batch.TASKS:
        batch.run_task(step, batch_id, enrolled)
    row = ledger.batch_row(enrolled, batch_id)
    reasons = {f["reason"] for f in ledger.file_rows(enrolled, batch_id)}
    assert (row["archived"], row["quarantined"], row["state"]) == (199, 1, "done"), reasons
    (bad,) = [f for f in ledger.file_rows(enrolled, batch_id) if f["reason"]]
    assert bad["reason"] == "truncated"
    assert_accounted(enrolled, 200)
