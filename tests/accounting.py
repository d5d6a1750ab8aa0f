"""The promise every fault test ends on: nothing lost, nothing duplicated.

What was uploaded is counted by the test itself, from the files it staged, never from the
ledger the pipeline writes: a ledger that forgot a file must fail the check, not shrink it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline import batch, enrollment, intake, ledger, quarantine, tables
from pipeline.demo import upload_trial
from pipeline.home import DataHome
from pipeline.protocol import Protocol
from pipeline.synth import PlannedBatch, SyntheticTrial


def files_in(paths: list[Path]) -> int:
    """How many files staging ``paths`` (files or folders) uploads."""
    return sum(
        sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 1 for path in paths
    )


def temporary_files(home: DataHome) -> list[Path]:
    """Temporary files left in the data home or the archive (which may lie outside it)."""
    return [p for folder in (home.root, home.archive) for p in folder.rglob("*.tmp")]


def stage(
    home: DataHome, planned: PlannedBatch, paths: list[Path] | None = None, check: bool = True
) -> tuple[str, int]:
    """Stage ``paths`` (default: the planned batch's folder) as a batch of ``planned``'s
    subject and visit; return the batch ID and how many files it uploaded."""
    paths = paths or [planned.folder]
    batch_id = intake.stage_batch(
        home, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, paths, check=check
    )
    return batch_id, files_in(paths)


def process(
    home: DataHome,
    batch_id: str,
    steps: tuple[str, ...] = tuple(batch.TASKS),
    run_id: str | None = None,
) -> None:
    """Run the batch through ``steps`` (default: every task), as the ingest DAG does
    (``run_id``: the DAG run's ID the ledger records)."""
    for step in steps:
        batch.run_task(step, batch_id, home, run_id=run_id)


def enroll_late(
    home: DataHome, protocol: Protocol, trial: SyntheticTrial, planned: PlannedBatch, folder: Path
) -> None:
    """Add ``planned``'s subject (arm B) to the enrollment list and import it again, as a
    coordinator does for a subject whose batch was quarantined as unenrolled."""
    rows = list(csv.reader(trial.enrollment_csv.open()))
    rows.append([planned.site_id, planned.subject_id, "B", "2025-08-20"])
    updated = folder / "enrollment.csv"
    with updated.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    enrollment.import_csv(home, protocol, updated)


def upload(home: DataHome, trial: SyntheticTrial) -> dict[str, int]:
    """Stage every planned batch of the trial (``upload_trial``); return
    ``{batch_id: files uploaded}``."""
    staged = upload_trial(home, trial)
    return {
        batch_id: files_in([planned.folder])
        for batch_id, planned in zip(staged, trial.batches, strict=True)
    }


def assert_accounted(home: DataHome, uploaded: int) -> None:
    """uploaded = archived + quarantined + duplicates; no duplicate archive files, each
    holding the bytes the ledger names; every quarantined file held in quarantine, every
    duplicate's bytes archived; Parquet rows = archived files; nothing left half-done,
    nothing left waiting in the inbox."""
    files = ledger.file_rows(home)
    assert len(files) == uploaded
    assert {f["disposition"] for f in files} <= {"archived", "quarantined", "duplicate"}
    archived = [f for f in files if f["disposition"] == "archived"]
    on_disk = sorted(home.archive.rglob("*.dcm"))
    assert len({f["archive_path"] for f in archived}) == len(archived), "archived twice"
    assert sorted(home.archive / f["archive_path"] for f in archived) == on_disk
    for f in archived:  # what the ledger says was archived is what the archive holds
        assert intake.sha256_file(home.archive / f["archive_path"]) == f["sha256_out"]
    assert tables.read_table(home, "instances").num_rows == len(archived)
    for f in files:  # what the ledger says is quarantined, quarantine holds
        if f["disposition"] == "quarantined":
            record = quarantine.read_record(home, f["batch_id"])
            assert record is not None, f"batch {f['batch_id']} has no quarantine record"
            (held,) = [item for item in record["files"] if item["file_no"] == f["file_no"]]
            kept = home.quarantined_batch(f["batch_id"]) / intake.FILES / held["path"]
            assert kept.exists(), f"quarantined file {f['batch_id']}:{f['file_no']} is gone"
    archived_bytes = {f["sha256_out"] for f in archived}
    for f in files:  # a duplicate is one of what the archive holds, not a file lost
        if f["disposition"] == "duplicate":
            assert f["sha256_out"] in archived_bytes, f"{f['batch_id']}:{f['file_no']}"
    assert intake.ready_batches(home) == [], "a READY batch was left unclaimed"
    assert not any(home.claimed.iterdir()), "a batch was left claimed"
    assert not temporary_files(home), "a temporary file was left behind"
    assert all(b["state"] in ("done", "quarantined") for b in ledger.batch_summaries(home))
