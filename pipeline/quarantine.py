"""Quarantine: refused originals kept with a machine-readable reason per file.

``quarantine/<batch>/`` holds the refused files as uploaded (so the core lab can look at
them and release them after a fix), the batch manifest, and ``quarantine.json`` with the
reason code, a detail that never quotes a value, and what the site should do.

The quarantine may live on an object store (``$TRIALPIPE_QUARANTINE_URL``, see
:mod:`pipeline.store`): each original and the record are then uploaded whole, and the
claimed copies go when finalize removes the claimed batch.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pipeline import atomic, intake, store
from pipeline.home import DataHome
from pipeline.reasons import Reason
from pipeline.worklist import FileEntry, Worklist

RECORD = "quarantine.json"


def put(
    home: DataHome,
    worklist: Worklist,
    refused: list[tuple[FileEntry, Path, str, str | None]],
) -> store.Location:
    """Put refused originals (entry, where it lies now, reason, detail) of a claimed batch
    into quarantine under their uploaded names, and describe why. Idempotent: a retry
    finds what an earlier attempt put there."""
    claimed = home.claimed_batch(worklist.batch_id)
    folder = home.quarantined_batch(worklist.batch_id)
    local = store.is_local(folder)
    for entry, source, _, _ in refused:
        target = folder / intake.FILES / entry.kept_name
        if local and (source.exists() or target.exists()):
            atomic.move_file(source, Path(target))
        elif not local and source.exists():
            # Copied, not moved: finalize removes the claimed batch once all is recorded.
            store.put_file_once(source, target)
    if (claimed / intake.MANIFEST).exists():
        store.put_file_once(claimed / intake.MANIFEST, folder / intake.MANIFEST)
    record = {
        "batch_id": worklist.batch_id,
        "protocol_id": worklist.protocol_id,
        "site_id": worklist.site_id,
        "subject_id": worklist.subject_id,
        "visit": worklist.visit,
        "batch_reason": worklist.batch_reason,
        "quarantined_at": dt.datetime.now(dt.UTC).isoformat(),
        "files": [
            {
                "file_no": entry.file_no,
                "path": entry.kept_name,
                "present": (folder / intake.FILES / entry.kept_name).exists(),
                "reason": reason,
                "detail": detail,
                "action": Reason(reason).info.action,
            }
            for entry, _, reason, detail in refused
        ],
    }
    return store.write_json(folder / RECORD, record)


def read_record(home: DataHome, batch_id: str) -> dict[str, Any] | None:
    """The batch's quarantine.json, or None if nothing of the batch was quarantined."""
    try:
        return json.loads((home.quarantined_batch(batch_id) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def listing(home: DataHome, site_id: str | None = None) -> list[dict[str, Any]]:
    """Every file whose current disposition is quarantined (the ledger's word), with its
    batch's site and, once confirmed, subject and visit; never a file name."""
    from pipeline import ledger

    batches = {row["batch_id"]: row for row in ledger.batch_summaries(home)}
    found = []
    for row in ledger.file_rows(home):
        batch = batches.get(row["batch_id"], {})
        if row["disposition"] != "quarantined":
            continue
        if site_id is not None and batch.get("site_id") != site_id:
            continue
        found.append(
            {
                "batch_id": row["batch_id"],
                "site_id": batch.get("site_id"),
                "subject_id": batch.get("subject_id"),
                "visit": batch.get("visit"),
                "file_no": row["file_no"],
                "reason": row["reason"],
                "detail": row["detail"],
                "quarantined_at": row["at"].isoformat(timespec="seconds"),
            }
        )
    return found
