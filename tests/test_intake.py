import json
import os

import pytest

from pipeline import intake
from pipeline.intake import UploadRefused, claim, ready_batches, sha256_file, stage_batch


@pytest.fixture
def batch_folder(trial):
    return trial.batches[0].folder


def test_upload_copies_files_writes_checksummed_manifest_then_ready(enrolled, trial):
    planned = trial.batches[1]
    batch_id = stage_batch(
        enrolled,
        "DEMO-01",
        planned.site_id,
        planned.subject_id,
        planned.visit,
        [planned.folder],
        uploader="coordinator",
    )
    folder = enrolled.batch_upload_dir("DEMO-01", planned.site_id, batch_id)
    manifest = json.loads((folder / intake.MANIFEST).read_text())
    assert manifest["subject_id"] == planned.subject_id and manifest["uploader"] == "coordinator"
    originals = sorted(p for p in planned.folder.rglob("*") if p.is_file())
    assert len(manifest["files"]) == len(originals)
    for item in manifest["files"]:
        assert sha256_file(folder / intake.FILES / item["path"]) == item["sha256"]
    assert (folder / intake.READY).exists()
    assert (
        os.stat(folder / intake.READY).st_mtime_ns >= os.stat(folder / intake.MANIFEST).st_mtime_ns
    )
    assert [b.batch_id for b in ready_batches(enrolled)] == [batch_id]


@pytest.mark.parametrize(
    ("protocol_id", "site", "subject_index", "visit", "message"),
    [
        ("NOPE-1", "SITE-01", 0, "BASELINE", "unknown protocol"),
        ("DEMO-01", "SITE-09", 0, "BASELINE", "not a site"),
        ("DEMO-01", "SITE-01", 0, "WEEK99", "not a visit"),
        ("DEMO-01", "SITE-02", 0, "BASELINE", "enrolled at another site"),
        ("DEMO-01", "SITE-01", None, "BASELINE", "not enrolled"),
    ],
)
def test_upload_is_refused_at_once(
    enrolled, trial, batch_folder, protocol_id, site, subject_index, visit, message
):
    subject = trial.batches[0].subject_id if subject_index == 0 else "DEMO-01-00000"
    with pytest.raises(UploadRefused, match=message):
        stage_batch(enrolled, protocol_id, site, subject, visit, [batch_folder])
    assert ready_batches(enrolled) == []


def test_a_batch_without_ready_marker_is_not_picked_up(enrolled, trial, batch_folder):
    planned = trial.batches[0]
    batch_id = stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [batch_folder]
    )
    (enrolled.batch_upload_dir("DEMO-01", planned.site_id, batch_id) / intake.READY).unlink()
    assert ready_batches(enrolled) == []


def test_claim_moves_the_batch_out_of_the_inbox_once(enrolled, trial, batch_folder):
    planned = trial.batches[0]
    batch_id = stage_batch(
        enrolled, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, [batch_folder]
    )
    claimed = claim(enrolled, batch_id)
    assert claimed == enrolled.claimed_batch(batch_id) and (claimed / intake.MANIFEST).exists()
    assert ready_batches(enrolled) == []
    assert claim(enrolled, batch_id) == claimed  # a retried claim finds its own work
    assert intake.read_origin(claimed) == {"protocol_id": "DEMO-01", "site_id": planned.site_id}
