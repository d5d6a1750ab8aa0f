"""Data home layout, atomic writes, the worklist hand-over and the synthetic trial."""

import pytest

from pipeline import atomic
from pipeline.dicomio import read_dicom
from pipeline.home import data_home
from pipeline.reasons import Reason
from pipeline.worklist import FileEntry, Worklist


def test_the_data_home_defaults_to_trialpipe_home_and_keeps_restricted_private(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TRIALPIPE_HOME", str(tmp_path / "h"))
    home = data_home().ensure()
    assert home.root == (tmp_path / "h").resolve()
    for name in ("inbox", "archive", "quarantine", "parquet", "restricted", "airflow"):
        assert (home.root / name).is_dir()
    assert (home.restricted.stat().st_mode & 0o777) == 0o700
    assert home.ledger_url == f"sqlite:///{home.root / 'ledger.sqlite'}"


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temporary(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    atomic.write_bytes(target, b"old")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_with(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.parquet"]


def test_move_file_is_idempotent(tmp_path):
    source, target = tmp_path / "a", tmp_path / "sub" / "b"
    source.write_text("x")
    atomic.move_file(source, target)
    atomic.move_file(source, target)  # a retried step
    assert target.read_text() == "x" and not source.exists()


def test_a_worklist_round_trips_through_its_file(tmp_path):
    worklist = Worklist(
        "b1",
        "DEMO-01",
        "SITE-01",
        "S-1",
        "BASELINE",
        arm="A",
        files=[
            FileEntry(
                0, "CT/a.dcm", "ab", 3, findings=[{"action": "flag", "detail": "KVP: flagged"}]
            )
        ],
    )
    loaded = Worklist.load(worklist.save(tmp_path / "state.json"))
    assert loaded == worklist and loaded.files[0].flags == ["KVP: flagged"]
    assert [e.file_no for e in loaded.in_play()] == [0]
    loaded.refuse_batch(Reason.MIXED_PATIENTS)
    assert loaded.in_play() == []


def test_the_synthetic_trial_plants_phi_where_scanners_put_it(trial):
    planned = trial.batches[0]
    patient = trial.patients[planned.subject_id]
    ds = read_dicom(sorted((planned.folder / "CT").glob("CT2_0001.dcm"))[0]).dataset
    assert str(ds.PatientName) == patient.name and ds.PatientID == patient.patient_id
    assert ds.OtherPatientIDsSequence[0].PatientID.startswith(patient.patient_id)
    assert ds.RequestAttributesSequence[0].AccessionNumber == ds.AccessionNumber
    private = [e for e in ds.iterall() if e.tag.is_private and e.VR == "LO"]
    assert patient.name in [str(e.value) for e in private]
    assert patient.name.split("^")[0] in ds.SeriesDescription


def test_the_synthetic_trial_has_both_arms_and_the_bad_cases(trial):
    assert set(trial.arms.values()) == {"A", "B"}
    expects = {b.expect for b in trial.batches}
    assert {"done", "mixed_patients", "unenrolled_subject"} <= expects
    assert set(trial.batches[0].bad_files.values()) == {"truncated", "not_dicom"}


def test_the_ledger_url_can_come_from_a_command_so_its_password_stays_in_a_file(
    tmp_path, monkeypatch
):
    url = "postgresql+psycopg://trialpipe:s3cret@db.example/trialpipe_ledger"
    (tmp_path / "ledger-url").write_text(url + "\n")
    monkeypatch.delenv("TRIALPIPE_LEDGER_URL", raising=False)
    monkeypatch.setenv("TRIALPIPE_LEDGER_URL_CMD", f"cat {tmp_path / 'ledger-url'}")
    assert data_home(tmp_path / "h").ledger_url == url


def test_archive_and_tables_stay_in_the_data_home_unless_a_url_moves_them(tmp_path, monkeypatch):
    monkeypatch.delenv("TRIALPIPE_ARCHIVE_URL", raising=False)
    monkeypatch.delenv("TRIALPIPE_TABLES_URL", raising=False)
    home = data_home(tmp_path / "h")
    assert (home.archive, home.parquet) == (home.root / "archive", home.root / "parquet")
    monkeypatch.setenv("TRIALPIPE_ARCHIVE_URL", str(tmp_path / "nfs" / "archive"))
    monkeypatch.setenv("TRIALPIPE_TABLES_URL", f"file://{tmp_path / 'nfs' / 'tables'}")
    moved = data_home(tmp_path / "h").ensure()
    assert moved.archive == (tmp_path / "nfs" / "archive").resolve()
    assert moved.parquet == (tmp_path / "nfs" / "tables").resolve()
    assert moved.archive.is_dir() and moved.parquet.is_dir()
    assert moved.table_locks == moved.root / "parquet" / ".locks"  # locks stay home


def test_writes_in_a_scratch_block_land_whole_and_wait_for_no_disk(tmp_path, monkeypatch):
    """The dry run's sandbox is thrown away: inside atomic.scratch() files still land by
    rename, but no fsync or sync waits for the disk; outside, every write is flushed."""
    import os

    from pipeline import atomic

    flushes: list[str] = []
    real_fsync, real_sync = os.fsync, os.sync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushes.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "sync", lambda: (flushes.append("sync"), real_sync())[1])
    with atomic.scratch():
        atomic.write_bytes(tmp_path / "a", b"scratch")
        atomic.sync()
    assert flushes == [] and (tmp_path / "a").read_bytes() == b"scratch"
    atomic.write_bytes(tmp_path / "b", b"durable")
    atomic.sync()
    assert flushes == ["fsync", "sync"] and (tmp_path / "b").read_bytes() == b"durable"
