"""The per-batch worklist that tasks hand to each other by path.

Each task reads the previous task's worklist file, decides for the files still in play, and
writes its own file (``inbox/.claimed/<batch>/state/<task>.json``) atomically. A retried
task starts again from its input file, so retries are idempotent. The worklist sits inside
the inbox because it names the uploaded files, whose names may carry identifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.home import safe_relative
from pipeline.reasons import Reason


@dataclass
class FileEntry:
    file_no: int
    path: str
    sha256: str | None = None
    size: int | None = None
    reason: str | None = None
    detail: str | None = None
    duplicate: bool = False
    staged: str | None = None
    sha256_out: str | None = None
    size_out: int | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    archive_path: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    row: dict[str, Any] | None = None
    # The protocol's required tags as the de-identified file has them, for validate.
    required: dict[str, Any] | None = None
    # Zip uploads: the zip is ``expanded`` and its members are files of their own whose
    # ``archive_of`` is the zip's number. The zip itself is kept, not accounted as a file.
    expanded: bool = False
    archive_of: int | None = None
    # Set when the file was released from quarantine: "<batch>:<file_no>" it came from.
    released_from: str | None = None

    @property
    def flags(self) -> list[str]:
        """Details of the findings that did not quarantine the file (archived, flagged)."""
        return [f["detail"] for f in self.findings if f["action"] == "flag"]

    @property
    def in_play(self) -> bool:
        """Still heading for the archive: not quarantined, not a duplicate, not a zip."""
        return self.reason is None and not self.duplicate and not self.expanded

    @property
    def kept_name(self) -> str:
        """The name the original is kept under (quarantine, restricted store): its uploaded
        path when that stays inside the folder, else its number."""
        return safe_relative(self.path) or f"unnamed/{self.file_no:06d}"

    def refuse(self, reason: Reason, detail: str | None = None) -> None:
        self.reason = reason.value
        self.detail = detail


@dataclass
class Worklist:
    batch_id: str
    protocol_id: str
    site_id: str
    subject_id: str
    visit: str
    arm: str | None = None
    batch_reason: str | None = None
    batch_detail: str | None = None
    qc_report: str | None = None
    files: list[FileEntry] = field(default_factory=list)

    def refuse_batch(self, reason: Reason, detail: str | None = None) -> None:
        self.batch_reason = reason.value
        self.batch_detail = detail

    def in_play(self) -> list[FileEntry]:
        """Files still heading for the archive (none once the batch is refused)."""
        if self.batch_reason:
            return []
        return [entry for entry in self.files if entry.in_play]

    def save(self, path: Path) -> Path:
        """Write the worklist to ``path`` atomically (compact JSON: a batch of thousands of
        files is saved by every task)."""
        payload = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "files"}
        payload["files"] = [vars(entry) for entry in self.files]
        return atomic.write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: Path) -> Worklist:
        raw = json.loads(path.read_text())
        raw["files"] = [FileEntry(**entry) for entry in raw.get("files", [])]
        return cls(**raw)
