"""Quarantine: refused originals kept with a machine-readable reason per file.

``quarantine/<batch>/`` holds the refused files as uploaded (so the core lab can look at
them and release them after a fix), the batch manifest, and ``quarantine.json`` with the
reason code, a detail that never quotes a value, and what the site should do.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pipeline import atomic, intake
from pipeline.home import DataHome
from pipeline.reasons import Reason
from pipeline.worklist import FileEntry, Worklist

RECORD = "quarantine.json"


def put(
    home: DataHome, worklist: Worklist, refused: list[tuple[FileEntry, str, str | None]]
) -> Path:
    """Move refused originals of a claimed batch into quarantine and describe why."""
    claimed = home.claimed_batch(worklist.batch_id)
    folder = home.quarantined_batch(worklist.batch_id)
    for entry, _, _ in refused:
        source = claimed / intake.FILES / entry.path
        if source.exists() or (folder / intake.FILES / entry.path).exists():
            atomic.move_file(source, folder / intake.FILES / entry.path)
    if (claimed / intake.MANIFEST).exists():
        atomic.copy_file(claimed / intake.MANIFEST, folder / intake.MANIFEST)
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
                "path": entry.path,
                "reason": reason,
                "detail": detail,
                "action": Reason(reason).info.action,
            }
            for entry, reason, detail in refused
        ],
    }
    return atomic.write_json(folder / RECORD, record)


def entries(home: DataHome) -> list[dict[str, Any]]:
    """Every quarantined file with its batch and reason."""
    found = []
    for record_path in sorted(home.quarantine.glob(f"*/{RECORD}")):
        record = json.loads(record_path.read_text())
        for item in record["files"]:
            found.append(
                {
                    "batch_id": record["batch_id"],
                    "site_id": record["site_id"],
                    "subject_id": record["subject_id"],
                    "visit": record["visit"],
                    **item,
                }
            )
    return found
