"""Quarantine management: list what is held, release it after a fix, audit both sides."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import batch, intake, ledger, tables
from pipeline.cli import main
from pipeline.demo import upload_trial
from pipeline.intake import ready_batches
from tests.accounting import enroll_late

TRIALPIPE = str(Path(sys.executable).parent / "trialpipe")


def process_all(home):
    for ready in ready_batches(home):
        for step in batch.TASKS:
            batch.run_task(step, ready.batch_id, home)


def cli(capsys, home, *args):
    code = main(["--home", str(home.root), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def processed(enrolled, trial):
    expected = upload_trial(enrolled, trial)
    process_all(enrolled)
    return expected


def test_list_shows_every_quarantined_file_by_number_and_reason(capsys, processed, enrolled):
    code, out, _ = cli(capsys, enrolled, "quarantine", "list", "--json")
    rows = json.loads(out)
    held = [f for f in ledger.file_rows(enrolled) if f["disposition"] == "quarantined"]
    assert code == 0 and len(rows) == len(held)
    assert {(r["batch_id"], r["file_no"], r["reason"]) for r in rows} == {
        (f["batch_id"], f["file_no"], f["reason"]) for f in held
    }
    code, out, _ = cli(capsys, enrolled, "quarantine", "list", "--site", "SITE-02")
    assert code == 0 and "SITE-01" not in out and "mixed_patients" in out
    assert "path" not in out  # numbers, never uploaded names


def test_releasing_an_unenrolled_batch_after_enrollment_archives_it(
    capsys, processed, enrolled, trial, protocol, tmp_path
):
    stranger = next(b for b, e in processed.items() if e == "unenrolled_subject")
    planned = next(b for b in trial.batches if b.expect == "unenrolled_subject")
    enroll_late(enrolled, protocol, trial, planned, tmp_path)

    code, out, _ = cli(capsys, enrolled, "quarantine", "release", stranger)
    assert code == 0
    new_id = out.split(" as batch ")[1].split()[0]
    process_all(enrolled)
    released = ledger.batch_summary(enrolled, new_id)
    assert released["state"] == "done" and released["released_from"] == stranger
    assert released["archived"] == released["files"] > 0
    old = ledger.file_rows(enrolled, stranger)
    assert {f["disposition"] for f in old} == {"released"}
    assert all(new_id in f["detail"] for f in old)

    code, out, _ = cli(capsys, enrolled, "audit", stranger)
    assert f"released to batch {new_id}" in out and " quarantined " in out
    code, out, _ = cli(capsys, enrolled, "audit", new_id)
    assert f"released from batch {stranger}" in out
    code, out, _ = cli(capsys, enrolled, "quarantine", "list")
    assert stranger not in out


def test_releasing_chosen_files_leaves_the_rest_in_quarantine(capsys, processed, enrolled):
    mixed = next(b for b, e in processed.items() if e == "mixed_patients")
    held = ledger.file_rows(enrolled, mixed)
    record = json.loads((enrolled.quarantined_batch(mixed) / "quarantine.json").read_text())
    (keep_back,) = [f["file_no"] for f in record["files"] if "other_patient" in f["path"]]
    chosen = ",".join(str(f["file_no"]) for f in held if f["file_no"] != keep_back)
    code, out, _ = cli(capsys, enrolled, "quarantine", "release", f"{mixed}:{chosen}")
    assert code == 0
    new_id = out.split(" as batch ")[1].split()[0]
    process_all(enrolled)
    assert ledger.batch_summary(enrolled, new_id)["state"] == "done"
    remaining = [f for f in ledger.file_rows(enrolled, mixed) if f["disposition"] == "quarantined"]
    assert [f["file_no"] for f in remaining] == [keep_back]
    # Every file of both batches is accounted for exactly once, counting a release as a move.
    total = ledger.file_rows(enrolled, mixed) + ledger.file_rows(enrolled, new_id)
    final = [f for f in total if f["disposition"] != "released"]
    assert len(final) == len(held)
    # The statisticians' batches table says the same.
    batches = {r["batch_id"]: r for r in tables.read_table(enrolled, "batches").to_pylist()}
    assert (batches[mixed]["quarantined"], batches[mixed]["released"]) == (1, len(held) - 1)
    assert batches[new_id]["archived"] == len(held) - 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nope", "nothing in quarantine"),
        ("{done}:999", "not quarantined"),
        ("{done}:x", "integers"),
    ],
)
def test_release_refusals_are_clear(capsys, processed, enrolled, target, message):
    done = next(b for b, e in processed.items() if e == "done")
    code, _, err = cli(capsys, enrolled, "quarantine", "release", target.format(done=done))
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("point", ["release_moves", "release_publish"])
def test_a_release_killed_half_way_is_finished_by_the_next_release(
    capsys, processed, enrolled, tmp_path, point
):
    """kill -9 of `trialpipe quarantine release` after its first file moved, or once
    everything but the READY marker is done; releasing again finishes that release: every
    file goes once, to the one new batch, and nothing is left behind."""
    mixed = next(b for b, e in processed.items() if e == "mixed_patients")
    held = {f["file_no"] for f in ledger.file_rows(enrolled, mixed)}
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / point).touch()
    killed = subprocess.Popen(
        [TRIALPIPE, "--home", str(enrolled.root), "quarantine", "release", mixed],
        env={**os.environ, "TRIALPIPE_FAULTS": str(faults)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (faults / f"{point}.pid").exists():
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.1)
    time.sleep(0.2)  # the PID is written before the pause begins
    os.kill(int((faults / f"{point}.pid").read_text()), signal.SIGKILL)
    assert killed.wait(30) == -signal.SIGKILL
    assert ready_batches(enrolled) == []  # nothing half-built is offered to the ingest

    code, out, _ = cli(capsys, enrolled, "quarantine", "release", mixed)
    assert code == 0
    new_id = out.split(" as batch ")[1].split()[0]
    assert [r["batch_id"] for r in ledger.batch_summaries(enrolled) if r["released_from"]] == [
        new_id
    ]
    old = ledger.file_rows(enrolled, mixed)
    assert {f["disposition"] for f in old} == {"released"}
    assert all(f["detail"] == f"released to batch {new_id}" for f in old)
    left = (enrolled.quarantined_batch(mixed) / "files").rglob("*")
    assert not [path for path in left if path.is_file()]
    assert not (enrolled.quarantined_batch(mixed) / "release.json").exists()
    manifest = json.loads(
        (intake.find_upload(enrolled, new_id) / intake.MANIFEST).read_text()  # READY
    )
    assert sorted(int(f["released_from"].split(":")[1]) for f in manifest["files"]) == sorted(held)
    process_all(enrolled)
    assert ledger.batch_summary(enrolled, new_id)["files"] == len(held)
    assert len(ledger.file_rows(enrolled, new_id)) == len(held)
    assert not list((enrolled.inbox / "DEMO-01").glob("*/*")), "a batch was left in the inbox"
    assert main(["--home", str(enrolled.root), "quarantine", "release", mixed]) == 2


def test_a_release_after_an_interrupted_one_finishes_it_and_names_what_it_did_not_release(
    capsys, processed, enrolled, monkeypatch
):
    """`release B:1,2` cut off, then `release B:3`: the first is finished (its files go
    once, to its batch), and the second is refused, saying file 3 is still held and the
    request must be repeated, never "released" while file 3 stays in quarantine."""
    from pipeline import release

    mixed = next(b for b, e in processed.items() if e == "mixed_patients")
    record = json.loads((enrolled.quarantined_batch(mixed) / "quarantine.json").read_text())
    (later,) = [f["file_no"] for f in record["files"] if "other_patient" in f["path"]]
    first = {f["file_no"] for f in record["files"]} - {later}

    class CutOff(Exception):
        pass

    def cut_off(point):
        if point == "release_moves":
            raise CutOff

    with monkeypatch.context() as patched:
        patched.setattr(release.faults, "checkpoint", cut_off)
        with pytest.raises(CutOff):
            release.release(enrolled, mixed, first)
    planned = json.loads((enrolled.quarantined_batch(mixed) / "release.json").read_text())

    code, out, err = cli(capsys, enrolled, "quarantine", "release", f"{mixed}:{later}")
    assert code == 2 and "released" not in out
    assert "interrupted release" in err and planned["batch_id"] in err
    assert f"[{later}] were not released" in err and "repeat" in err
    rows = {f["file_no"]: f for f in ledger.file_rows(enrolled, mixed)}
    assert {n for n, f in rows.items() if f["disposition"] == "released"} == first
    assert rows[later]["disposition"] == "quarantined"
    assert [b.batch_id for b in ready_batches(enrolled)] == [planned["batch_id"]]

    code, out, _ = cli(capsys, enrolled, "quarantine", "release", f"{mixed}:{later}")
    assert code == 0 and out.startswith(f"released 1 file(s) of {mixed}")
    process_all(enrolled)
    assert {f["disposition"] for f in ledger.file_rows(enrolled, mixed)} == {"released"}
