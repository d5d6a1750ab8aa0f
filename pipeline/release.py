"""``trialpipe quarantine release``: send quarantined files through the pipeline again
after a fix (the subject enrolled, the intruding image left behind, the recipe or the
protocol's range corrected).

The released originals move from ``quarantine/<batch>/`` (or the quarantine's object
store, from which they are downloaded and then deleted) into a new upload batch in the
inbox, whose manifest names the batch and file number each came from; the next ingest run
(``trialpipe run``, or the intake sensor in a deployment) judges them afresh. The ledger
records the release on both sides: each file's latest event in the old batch becomes
``released`` with the new batch's ID, and the new batch is registered as released from the
old one, so ``trialpipe audit`` follows a file from upload to its final disposition.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
from pathlib import Path
from typing import Any

from pipeline import atomic, faults, intake, ledger, quarantine, store
from pipeline.batch import UNKNOWN, refresh_batch_counts
from pipeline.home import DataHome
from pipeline.protocol import ProtocolError, load_protocol
from pipeline.reasons import BatchState, Disposition


class ReleaseRefused(ValueError):
    """Nothing can be released as asked; the message says why."""


def parse_target(target: str) -> tuple[str, set[int] | None]:
    """``BATCH`` (every quarantined file) or ``BATCH:N[,N...]`` (those file numbers)."""
    batch_id, _, numbers = target.partition(":")
    if not numbers:
        return batch_id, None
    try:
        return batch_id, {int(n) for n in numbers.split(",") if n.strip()}
    except ValueError:
        raise ReleaseRefused(f"file numbers must be integers: {numbers!r}") from None


def release(
    home: DataHome, batch_id: str, file_nos: set[int] | None = None, by: str | None = None
) -> tuple[str, int]:
    """Release the batch's quarantined files (or those numbered ``file_nos``) into a new
    READY batch; return its ID and how many files it holds.

    The release is planned before any file moves (``quarantine/<batch>/release.json``: the
    new batch's ID, the files, who and when), and every step after is safe to repeat, so
    a release cut off half-way (a crash, kill -9) is finished by the next release of the
    same batch: the planned files go to the planned batch, none lost, none twice. When
    that next release asked for files the interrupted one did not hold, it is refused
    once the interrupted one is finished, naming what was released and what was not, so
    nothing asked for stays in quarantine unsaid; asking again releases those."""
    pending = _pending(home, batch_id)
    if pending is None:
        return _carry_out(home, batch_id, _plan(home, batch_id, file_nos, by))
    new_id, count = _carry_out(home, batch_id, pending)
    finished = sorted(item["file_no"] for item in pending["files"])
    if file_nos is None:
        left = _releasable(home, batch_id, quarantine.read_record(home, batch_id))
    else:
        left = file_nos - set(finished)
    if left:
        raise ReleaseRefused(
            f"an interrupted release of batch {batch_id} was finished first: file(s)"
            f" {finished} went to batch {new_id} (asked by {pending['uploader']});"
            f" file(s) {sorted(left)} were not released: repeat the request to release them"
        )
    return new_id, count


PLAN = "release.json"
_MOVING, _RECORDED = "moving", "recorded"


def _pending(home: DataHome, batch_id: str) -> dict[str, Any] | None:
    """The plan of a release of this batch that was cut off, if any."""
    try:
        return json.loads((home.quarantined_batch(batch_id) / PLAN).read_text())
    except (OSError, ValueError):
        return None


def _plan(
    home: DataHome, batch_id: str, file_nos: set[int] | None, by: str | None
) -> dict[str, Any]:
    """Check the release may go ahead, choose its files and save the plan."""
    record = quarantine.read_record(home, batch_id)
    summary = ledger.batch_summary(home, batch_id)
    if record is None or summary is None:
        raise ReleaseRefused(f"batch {batch_id} has nothing in quarantine")
    if summary["protocol_id"] == UNKNOWN:
        raise ReleaseRefused(
            f"batch {batch_id} came with an invalid manifest: upload it again with the "
            "trialpipe client instead"
        )
    try:
        load_protocol(record["protocol_id"])
    except ProtocolError as error:
        raise ReleaseRefused(str(error)) from None
    releasable = _releasable(home, batch_id, record)
    chosen = [
        {"file_no": item["file_no"], "path": item["path"]}
        for item in record["files"]
        if item["file_no"] in releasable and (file_nos is None or item["file_no"] in file_nos)
    ]
    if file_nos is not None and {i["file_no"] for i in chosen} != file_nos:
        missing = sorted(file_nos - {i["file_no"] for i in chosen})
        raise ReleaseRefused(f"not quarantined in batch {batch_id}: file(s) {missing}")
    if not chosen:
        raise ReleaseRefused(f"batch {batch_id} has no quarantined file left to release")
    plan = {
        "batch_id": intake.new_batch_id(),
        "files": chosen,
        "uploader": by or getpass.getuser(),
        "uploaded_at": dt.datetime.now(dt.UTC).isoformat(),
        "stage": _MOVING,
    }
    store.write_json(home.quarantined_batch(batch_id) / PLAN, plan)
    return plan


def _releasable(home: DataHome, batch_id: str, record: dict[str, Any] | None) -> set[int]:
    """The numbers of the batch's files that are quarantined and held in its folder
    (``record``: its quarantine record, as the caller read it)."""
    if record is None:
        return set()
    current = {
        row["file_no"]
        for row in ledger.file_rows(home, batch_id)
        if row["disposition"] == Disposition.QUARANTINED.value
    }
    folder = home.quarantined_batch(batch_id) / intake.FILES
    return {
        item["file_no"]
        for item in record["files"]
        if item["file_no"] in current and (folder / item["path"]).is_file()
    }


def _carry_out(home: DataHome, batch_id: str, plan: dict[str, Any]) -> tuple[str, int]:
    """Move the planned files into the new batch, record the release on both sides, then
    make the batch READY; each step finds what an interrupted run of it left done."""
    record = quarantine.read_record(home, batch_id)
    if record is None:  # the plan was made from it, and it is rewritten, never removed
        raise ReleaseRefused(
            f"batch {batch_id} has a release plan but no {quarantine.RECORD}: restore it"
            " from backup, then release again"
        )
    new_id, chosen, uploader = plan["batch_id"], plan["files"], plan["uploader"]
    folder = home.quarantined_batch(batch_id)
    target = home.batch_upload_dir(record["protocol_id"], record["site_id"], new_id)
    # An upload area on an object store takes the batch once it is built, READY last.
    building = Path(target) if store.is_local(target) else home.claimed / f".release-{new_id}"
    if plan["stage"] == _MOVING:
        entries = []
        for item in chosen:
            moved = building / intake.FILES / item["path"]
            store.move_to_local(folder / intake.FILES / item["path"], moved)
            faults.checkpoint("release_moves")
            entries.append(
                {
                    "path": item["path"],
                    "sha256": intake.sha256_file(moved),
                    "size": moved.stat().st_size,
                    "released_from": f"{batch_id}:{item['file_no']}",
                }
            )
        atomic.write_json(
            building / intake.MANIFEST,
            {
                "batch_id": new_id,
                "protocol_id": record["protocol_id"],
                "site_id": record["site_id"],
                "subject_id": record["subject_id"],
                "visit": record["visit"],
                "uploader": uploader,
                "uploaded_at": plan["uploaded_at"],
                "released_from": batch_id,
                "files": entries,
            },
        )
        _record(home, batch_id, record, plan, len(entries))
        plan["stage"] = _RECORDED
        store.write_json(folder / PLAN, plan)
    faults.checkpoint("release_publish")
    _publish(home, new_id, building, target)
    # The plan is what finishes a cut-off release: it goes only once READY is on disk.
    (folder / PLAN).unlink(missing_ok=True)
    return new_id, len(chosen)


def _record(
    home: DataHome, batch_id: str, record: dict[str, Any], plan: dict[str, Any], count: int
) -> None:
    """The release in the ledger (both batches), quarantine.json and the batches table;
    a repeat appends and changes nothing."""
    new_id, uploader = plan["batch_id"], plan["uploader"]
    ledger.register_batch(
        home,
        new_id,
        record["protocol_id"],
        record["site_id"],
        files=count,
        uploader=uploader,
        uploaded_at=plan["uploaded_at"],
        released_from=batch_id,
    )
    # A repeat finds the files already released: their rows say the same.
    rows = {row["file_no"]: row for row in ledger.file_rows(home, batch_id)}
    ledger.record_files(
        home,
        batch_id,
        [
            ledger.FileRecord(
                item["file_no"],
                rows[item["file_no"]]["sha256_in"],
                rows[item["file_no"]]["size"],
                Disposition.RELEASED,
                rows[item["file_no"]]["reason"],
                f"released to batch {new_id}",
            )
            for item in plan["files"]
        ],
    )
    summary = ledger.batch_summary(home, batch_id)
    if summary is None:  # the plan was made for a registered batch
        raise ReleaseRefused(f"batch {batch_id} has a release plan but is not in the ledger")
    ledger.set_state(
        home,
        batch_id,
        BatchState(summary["state"]),
        f"released {count} file(s) to batch {new_id} by {uploader}",
        reason=summary["reason"],
    )
    planned = {item["file_no"] for item in plan["files"]}
    for item in record["files"]:
        if item["file_no"] in planned:
            item["released_to"] = new_id
            item["present"] = False
    store.write_json(home.quarantined_batch(batch_id) / quarantine.RECORD, record)
    refresh_batch_counts(home, batch_id)


def _publish(home: DataHome, new_id: str, building: Path, target: store.Location) -> None:
    """Make the new batch READY in the upload area, on disk (or in the store) before
    this returns, unless an earlier attempt did and the ingest has taken it since
    (claimed, or finalized)."""
    if home.claimed_batch(new_id).exists() or home.batch_record(new_id).exists():
        if not store.is_local(target):  # the originals uploaded, their local copy not gone
            intake.remove_tree(building)
        return
    if store.is_local(target):
        atomic.sync()  # the moved files and the manifest are on disk before READY says so
        # Created, never written: an empty file appears whole. Its folder is not created
        # again (as writing it by a rename would): a claim that renamed it away meanwhile
        # has the batch.
        with contextlib.suppress(FileNotFoundError):
            os.close(os.open(Path(target) / intake.READY, os.O_WRONLY | os.O_CREAT, 0o644))
        atomic.sync()  # READY on disk before the plan, which would make it again, goes
    elif building.exists():  # gone once the upload finished
        intake.upload_folder(building, target)
        intake.remove_tree(building)
