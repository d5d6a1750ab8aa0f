"""The DAG's task functions run in order in-process (no scheduler): what each batch becomes."""

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline import batch, intake, ledger, tables
from pipeline.demo import upload_trial
from pipeline.reasons import Reason
from pipeline.worklist import Worklist
from tests.accounting import assert_accounted, process, stage


@pytest.fixture
def processed(enrolled, trial):
    expected = upload_trial(enrolled, trial)
    for batch_id in expected:
        process(enrolled, batch_id)
    return expected


def test_every_file_is_archived_quarantined_or_a_duplicate(processed, enrolled):
    for row in ledger.batch_summaries(enrolled):
        assert row["files"] == row["archived"] + row["quarantined"] + row["duplicates"]
        assert row["state"] in ("done", "quarantined")
    archived = [f for f in ledger.file_rows(enrolled) if f["disposition"] == "archived"]
    on_disk = sorted(p for p in enrolled.archive.rglob("*.dcm"))
    assert len(on_disk) == len(archived)
    assert sorted(enrolled.archive / f["archive_path"] for f in archived) == on_disk


def test_bad_files_are_quarantined_with_reasons_and_the_rest_archived(processed, enrolled, trial):
    first = next(
        b
        for b in ledger.batch_summaries(enrolled)
        if b["subject_id"] == trial.batches[0].subject_id and b["visit"] == "BASELINE"
    )
    assert first["state"] == "done" and first["quarantined"] == 2 and first["archived"] > 0
    record = json.loads(
        (enrolled.quarantined_batch(first["batch_id"]) / "quarantine.json").read_text()
    )
    reasons = {Path(f["path"]).name: f["reason"] for f in record["files"]}
    assert reasons == trial.batches[0].bad_files
    for item in record["files"]:
        assert (enrolled.quarantined_batch(first["batch_id"]) / "files" / item["path"]).exists()
        assert item["action"] == Reason(item["reason"]).info.action


def test_batch_level_problems_quarantine_the_whole_batch(processed, enrolled):
    states = {
        b["batch_id"]: (b["state"], b["reason"], b["archived"])
        for b in ledger.batch_summaries(enrolled)
    }
    for batch_id, expect in processed.items():
        if expect == "done":
            assert states[batch_id][0] == "done"
        else:
            assert states[batch_id] == ("quarantined", expect, 0)


def test_a_follow_up_of_another_patient_is_quarantined(
    processed, enrolled, trial, protocol, tmp_path
):
    from pipeline.synth import make_wrong_patient_batch

    subject = trial.batches[0].subject_id
    wrong = make_wrong_patient_batch(tmp_path / "later", protocol, trial, subject, "WEEK24")
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", wrong.site_id, subject, "WEEK24", [wrong.folder]
    )
    process(enrolled, batch_id)
    row = ledger.batch_summary(enrolled, batch_id)
    assert (row["state"], row["reason"]) == ("quarantined", "patient_mismatch")


def test_parquet_rows_equal_archived_files_and_carry_the_arm(processed, enrolled, trial):
    table = tables.read_table(enrolled, "instances").to_pylist()
    archived = [f for f in ledger.file_rows(enrolled) if f["disposition"] == "archived"]
    assert len(table) == len(archived)
    assert {r["archive_path"] for r in table} == {f["archive_path"] for f in archived}
    for row in table:
        assert row["arm"] == trial.arms[row["subject_id"]]
        assert row["protocol"] == "DEMO-01" and row["site"].startswith("SITE-")
        assert row["study_day"] is not None and 0 <= row["study_day"] < 120


def test_archive_layout_is_protocol_arm_subject_visit_study_series_instance(
    processed, enrolled, trial
):
    for path in enrolled.archive.rglob("*.dcm"):
        protocol_id, arm, subject, visit, study, series, name = path.relative_to(
            enrolled.archive
        ).parts
        assert protocol_id == "DEMO-01" and arm == trial.arms[subject]
        assert visit in ("BASELINE", "WEEK12")
        assert study.startswith("2.25.") and series.startswith("2.25.")
        assert name.startswith("2.25.") and name.endswith(".dcm")


def _outputs(home, batch_id):
    """What a batch's processing has produced so far: archive, tables, ledger."""
    with ledger._engine(home).connect() as conn:
        slots = [dict(r._mapping) for r in conn.execute(select(ledger.archive_index))]
    return {
        "archive": {
            p.relative_to(home.archive).as_posix(): intake.sha256_file(p)
            for p in home.archive.rglob("*.dcm")
        },
        "tables": {
            name: sorted(
                json.dumps(row, sort_keys=True, default=str)
                for row in tables.read_table(home, name).to_pylist()
            )
            for name in tables.TABLES
        },
        "ledger": ledger.trail(home, batch_id),
        "slots": slots,
    }


def test_rerunning_every_task_of_a_batch_changes_nothing(enrolled, trial, monkeypatch):
    """Each task is run again for real after it completed, as an Airflow retry of a task
    killed just before it recorded its completion: same worklist, same outputs."""
    planned = trial.batches[1]
    batch_id, uploaded = stage(enrolled, planned)
    steps = list(batch.TASKS)
    for step in steps[:-1]:
        batch.run_task(step, batch_id, enrolled)
        done = batch._state(enrolled, batch_id, batch.OUTPUT[step])
        worklist, outputs = Worklist.load(done), _outputs(enrolled, batch_id)
        done.unlink()  # without its completion marker, run_task runs the task again
        batch.run_task(step, batch_id, enrolled)
        assert Worklist.load(done) == worklist, step
        assert _outputs(enrolled, batch_id) == outputs, step
    # Finalize's completion is the claimed folder's removal: cut it off just before.
    with monkeypatch.context() as patched:
        patched.setattr(intake, "remove_tree", _crash)
        with pytest.raises(RuntimeError, match="killed"):
            batch.run_task("finalize", batch_id, enrolled)
    assert enrolled.claimed_batch(batch_id).exists()
    outputs = _outputs(enrolled, batch_id)
    batch.run_task("finalize", batch_id, enrolled)
    assert _outputs(enrolled, batch_id) == outputs
    assert ledger.batch_summary(enrolled, batch_id)["state"] == "done"
    assert_accounted(enrolled, uploaded)


def _crash(folder):
    raise RuntimeError("killed")


EARLY = ("claim", "deidentify", "verify", "validate")
LATE = ("write_tables", "route", "finalize")


def _interleaved(home, batch_ids):
    """Both batches decide (validate) before either routes, as two DAG runs in the ingest
    pool's slots can."""
    for steps in (EARLY, LATE):
        for step in steps:
            for batch_id in batch_ids:
                batch.run_task(step, batch_id, home)


def test_two_batches_of_the_same_upload_deciding_at_once_archive_each_instance_once(
    enrolled, trial
):
    planned = trial.batches[1]
    staged = [stage(enrolled, planned) for _ in range(2)]
    _interleaved(enrolled, [batch_id for batch_id, _ in staged])
    first, second = (ledger.batch_summary(enrolled, batch_id) for batch_id, _ in staged)
    assert first["archived"] > 0 and second["archived"] == 0
    assert second["duplicates"] == first["archived"]
    assert first["quarantined"] == second["quarantined"] == 1  # the QC refusal, in each
    assert_accounted(enrolled, sum(files for _, files in staged))


def _other_pixels(folder, target):
    """The same images (same SOP Instance UIDs) with other pixel bytes, as a re-export."""
    import pydicom

    for source in sorted(folder.rglob("*.dcm")):
        copy = target / source.relative_to(folder)
        copy.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(source)
        pixels = bytearray(ds.PixelData)
        pixels[0] ^= 0xFF
        ds.PixelData = bytes(pixels)
        ds.save_as(copy)
    return target


def test_two_batches_deciding_at_once_on_other_content_quarantine_the_later_as_conflicts(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    resend = _other_pixels(planned.folder, tmp_path / "resend")
    staged = [stage(enrolled, planned), stage(enrolled, planned, [resend])]
    _interleaved(enrolled, [batch_id for batch_id, _ in staged])
    first, second = (ledger.file_rows(enrolled, batch_id) for batch_id, _ in staged)
    assert {f["disposition"] for f in first} == {"archived"}
    assert {(f["disposition"], f["reason"]) for f in second} == {
        ("quarantined", Reason.SOP_INSTANCE_CONFLICT.value)
    }
    assert len(second) == len(first)
    # The archived files are the first batch's bytes, not overwritten by the second's.
    assert_accounted(enrolled, sum(files for _, files in staged))


def test_the_same_file_twice_in_one_upload_is_archived_once_and_recorded_as_a_duplicate(
    enrolled, trial
):
    planned = trial.batches[2]
    again = sorted((planned.folder / "CT").glob("*.dcm"))[0]
    batch_id, uploaded = stage(enrolled, planned, [planned.folder, again])
    process(enrolled, batch_id)
    row = ledger.batch_summary(enrolled, batch_id)
    assert (row["archived"], row["duplicates"], row["quarantined"]) == (uploaded - 1, 1, 0)
    (duplicate,) = [
        f for f in ledger.file_rows(enrolled, batch_id) if f["disposition"] == "duplicate"
    ]
    assert duplicate["file_no"] == uploaded - 1  # the later copy; the first is archived
    assert_accounted(enrolled, uploaded)


def test_two_files_of_one_upload_with_one_instance_and_other_content_are_a_conflict(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    one = sorted((planned.folder / "CT").glob("*.dcm"))[0]
    (changed,) = _other_pixels(one.parent, tmp_path / "changed").rglob(one.name)
    batch_id, uploaded = stage(enrolled, planned, [planned.folder, changed])
    process(enrolled, batch_id)
    (refused,) = [f for f in ledger.file_rows(enrolled, batch_id) if f["reason"]]
    assert refused["reason"] == Reason.SOP_INSTANCE_CONFLICT.value
    assert refused["detail"] == "differs from another file of this batch"
    record = json.loads((enrolled.quarantined_batch(batch_id) / "quarantine.json").read_text())
    assert [f["path"] for f in record["files"]] == [one.name]  # the later, changed copy
    assert ledger.batch_summary(enrolled, batch_id)["archived"] == uploaded - 1
    assert_accounted(enrolled, uploaded)


def test_the_same_batch_uploaded_twice_is_recorded_as_duplicates(enrolled, trial):
    planned = trial.batches[1]
    ids = [
        intake.stage_batch(
            enrolled,
            "DEMO-01",
            planned.site_id,
            planned.subject_id,
            planned.visit,
            [planned.folder],
        )
        for _ in range(2)
    ]
    for batch_id in ids:
        process(enrolled, batch_id)
    first, second = (ledger.batch_summary(enrolled, i) for i in ids)
    counts = {r["batch_id"]: r for r in ledger.batch_summaries(enrolled)}
    assert counts[ids[0]]["archived"] == counts[ids[1]]["duplicates"] > 0
    assert counts[ids[1]]["archived"] == 0
    assert len(list(enrolled.archive.rglob("*.dcm"))) == counts[ids[0]]["archived"]
    assert first["state"] == second["state"] == "done"


def test_originals_of_archived_files_are_kept_only_in_the_restricted_store(processed, enrolled):
    assert list(enrolled.claimed.iterdir()) == []
    kept = list((enrolled.restricted / "originals").rglob("*.dcm"))
    archived = [f for f in ledger.file_rows(enrolled) if f["disposition"] == "archived"]
    assert len(kept) == len(archived)


def test_a_manifest_naming_an_unknown_site_quarantines_the_batch(enrolled, trial):
    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    manifest_path = (
        enrolled.batch_upload_dir("DEMO-01", planned.site_id, batch_id) / "manifest.json"
    )
    manifest = json.loads(manifest_path.read_text())
    manifest["site_id"] = "SITE-77"
    manifest_path.write_text(json.dumps(manifest))
    process(enrolled, batch_id)
    row = ledger.batch_summary(enrolled, batch_id)
    assert (row["state"], row["reason"]) == ("quarantined", "manifest_invalid")


def test_a_file_changed_after_upload_fails_its_checksum(enrolled, trial):
    planned = trial.batches[1]
    batch_id = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    folder = enrolled.batch_upload_dir("DEMO-01", planned.site_id, batch_id) / "files"
    victim = sorted(folder.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-2] + b"\x00\x01")
    process(enrolled, batch_id)
    reasons = [f["reason"] for f in ledger.file_rows(enrolled, batch_id) if f["reason"]]
    assert reasons == ["checksum_mismatch"]


def test_the_same_instances_with_other_content_are_conflicts_and_quarantined(
    enrolled, trial, tmp_path
):
    import pydicom

    planned = trial.batches[1]
    first = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [planned.folder]
    )
    process(enrolled, first)
    before = ledger.file_rows(enrolled, first)
    archived = sum(f["disposition"] == "archived" for f in before)
    # The site re-exports the visit: same SOP Instance UIDs, other pixels.
    resend = tmp_path / "resend"
    for source in sorted(planned.folder.rglob("*.dcm")):
        target = resend / source.relative_to(planned.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(source)
        if "PixelData" in ds:
            pixels = bytearray(ds.PixelData)
            pixels[0] ^= 0xFF
            ds.PixelData = bytes(pixels)
        ds.save_as(target)
    second = intake.stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [resend]
    )
    archive = sorted(enrolled.archive.rglob("*.dcm"))
    process(enrolled, second)
    after = ledger.file_rows(enrolled, second)
    reasons = [f["reason"] for f in after if f["disposition"] == "quarantined"]
    assert archived > 0
    assert reasons.count(Reason.SOP_INSTANCE_CONFLICT.value) == archived
    assert not [f for f in after if f["disposition"] in ("archived", "duplicate")]
    assert sorted(enrolled.archive.rglob("*.dcm")) == archive  # nothing archived twice


def test_worker_processes_change_nothing_but_the_speed(tmp_path, protocol, trial, monkeypatch):
    """The same batch through one process and through two gives the same archive, bytes
    and dispositions (same trial key in both homes, so the same pseudonyms)."""
    from pipeline import enrollment, pseudonyms
    from pipeline.home import data_home

    results = []
    key = b""
    for processes in ("1", "2"):
        monkeypatch.setenv("TRIALPIPE_WORKERS", processes)
        home = data_home(tmp_path / f"home-{processes}").ensure()
        enrollment.import_csv(home, protocol, trial.enrollment_csv)
        secret = home.secret_file("DEMO-01")
        if key:  # the second home gets the first one's key
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_bytes(key)
        pseudonyms.trial_secret(home, "DEMO-01")  # made on first use in the first home
        key = secret.read_bytes()
        for planned in trial.batches[:3]:
            process(home, stage(home, planned, check=False)[0])
        archive = {
            path.relative_to(home.archive).as_posix(): path.read_bytes()
            for path in home.archive.rglob("*.dcm")
        }
        dispositions = sorted(
            (f["disposition"], f["reason"] or "", f["sha256_out"] or "")
            for f in ledger.file_rows(home)
        )
        results.append((archive, dispositions))
    assert results[0][0] and results[0] == results[1]
