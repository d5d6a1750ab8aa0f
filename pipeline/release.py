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

import datetime as dt
import getpass
from pathlib import Path

from pipeline import atomic, intake, ledger, quarantine, store
from pipeline.batch import refresh_batch_counts
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
    READY batch; return its ID and how many files it holds."""
    record = quarantine.read_record(home, batch_id)
    summary = ledger.batch_row(home, batch_id)
    if record is None or summary is None:
        raise ReleaseRefused(f"batch {batch_id} has nothing in quarantine")
    if summary["protocol_id"] == "unknown":
        raise ReleaseRefused(
            f"batch {batch_id} came with an invalid manifest: upload it again with the "
            "trialpipe client instead"
        )
    try:
        load_protocol(record["protocol_id"])
    except ProtocolError as error:
        raise ReleaseRefused(str(error)) from None
    current = {
        row["file_no"]: row
        for row in ledger.file_rows(home, batch_id)
        if row["disposition"] == Disposition.QUARANTINED.value
    }
    folder = home.quarantined_batch(batch_id)
    chosen = [
        item
        for item in record["files"]
        if item["file_no"] in current
        and (file_nos is None or item["file_no"] in file_nos)
        and (folder / intake.FILES / item["path"]).is_file()
    ]
    if file_nos is not None and {i["file_no"] for i in chosen} != file_nos:
        missing = sorted(file_nos - {i["file_no"] for i in chosen})
        raise ReleaseRefused(f"not quarantined in batch {batch_id}: file(s) {missing}")
    if not chosen:
        raise ReleaseRefused(f"batch {batch_id} has no quarantined file left to release")
    new_id = intake.new_batch_id()
    target = home.batch_upload_dir(record["protocol_id"], record["site_id"], new_id)
    # An upload area on an object store takes the batch once it is built, READY last.
    building = Path(target) if store.is_local(target) else home.claimed / f".release-{new_id}"
    entries = []
    for item in chosen:
        moved = building / intake.FILES / item["path"]
        store.move_to_local(folder / intake.FILES / item["path"], moved)
        entries.append(
            {
                "path": item["path"],
                "sha256": intake.sha256_file(moved),
                "size": moved.stat().st_size,
                "released_from": f"{batch_id}:{item['file_no']}",
            }
        )
    uploader = by or getpass.getuser()
    manifest = {
        "batch_id": new_id,
        "protocol_id": record["protocol_id"],
        "site_id": record["site_id"],
        "subject_id": record["subject_id"],
        "visit": record["visit"],
        "uploader": uploader,
        "uploaded_at": dt.datetime.now(dt.UTC).isoformat(),
        "released_from": batch_id,
        "files": entries,
    }
    atomic.write_json(building / intake.MANIFEST, manifest)
    ledger.register_batch(
        home,
        new_id,
        record["protocol_id"],
        record["site_id"],
        files=len(entries),
        uploader=uploader,
        uploaded_at=manifest["uploaded_at"],
        released_from=batch_id,
    )
    ledger.record_files(
        home,
        batch_id,
        [
            ledger.FileRecord(
                item["file_no"],
                current[item["file_no"]]["sha256_in"],
                current[item["file_no"]]["size"],
                Disposition.RELEASED,
                current[item["file_no"]]["reason"],
                f"released to batch {new_id}",
            )
            for item in chosen
        ],
    )
    ledger.set_state(
        home,
        batch_id,
        BatchState(summary["state"]),
        f"released {len(chosen)} file(s) to batch {new_id} by {uploader}",
        reason=summary["reason"],
    )
    for item in record["files"]:
        if item in chosen:
            item["released_to"] = new_id
            item["present"] = False
    store.write_json(folder / quarantine.RECORD, record)
    refresh_batch_counts(home, batch_id)
    if store.is_local(target):
        atomic.write_bytes(building / intake.READY, b"")
    else:
        intake.upload_folder(building, target)
        intake.remove_tree(building)
    return new_id, len(entries)
