"""The audit ledger: batches, their state changes, and where every uploaded file went.

Holds no PHI: batches are named by trial identifiers (site, subject, visit), files by their
position in the manifest and their checksums, never by their original names or contents.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from pipeline import db
from pipeline.home import DataHome
from pipeline.reasons import BatchState, Disposition

metadata = MetaData()

batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("protocol_id", String(64), nullable=False),
    Column("site_id", String(64), nullable=False),
    Column("subject_id", String(64), nullable=False),
    Column("visit", String(64), nullable=False),
    Column("uploader", String(128)),
    Column("uploaded_at", DateTime(timezone=True)),
    Column("files", Integer, nullable=False, default=0),
    Column("state", String(16), nullable=False),
    Column("reason", String(48)),
    Column("recipe_version", String(64)),
    Column("code_version", String(32)),
    Column("dag_run_id", String(250)),
    Column("updated_at", DateTime(timezone=True)),
)

batch_events = Table(
    "batch_events",
    metadata,
    Column("event_id", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(128), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("detail", String(500)),
)

files = Table(
    "files",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("file_no", Integer, primary_key=True),
    Column("sha256_in", String(64)),
    Column("size", Integer),
    Column("disposition", String(16), nullable=False),
    Column("reason", String(48)),
    Column("detail", String(500)),
    Column("sha256_out", String(64)),
    Column("archive_path", String(500)),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

archive_index = Table(
    "archive_index",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("batch_id", String(128), nullable=False),
    Column("file_no", Integer, nullable=False),
    Column("sha256_out", String(64), nullable=False),
    Column("archive_path", String(500), nullable=False),
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _engine(home: DataHome) -> Engine:
    return db.ready(home.ledger_url, metadata)


@dataclass(frozen=True)
class FileRecord:
    """The final disposition of one uploaded file."""

    file_no: int
    sha256_in: str | None
    size: int | None
    disposition: Disposition
    reason: str | None = None
    detail: str | None = None
    sha256_out: str | None = None
    archive_path: str | None = None


def register_batch(home: DataHome, manifest: dict[str, Any], batch_id: str) -> None:
    """Record a batch from its manifest; a second call for the same batch changes nothing."""
    eng = _engine(home)
    with eng.begin() as conn:
        if conn.execute(select(batches.c.batch_id).where(batches.c.batch_id == batch_id)).first():
            return
        conn.execute(
            insert(batches).values(
                batch_id=batch_id,
                protocol_id=str(manifest.get("protocol_id", "")),
                site_id=str(manifest.get("site_id", "")),
                subject_id=str(manifest.get("subject_id", "")),
                visit=str(manifest.get("visit", "")),
                uploader=str(manifest.get("uploader", "")),
                uploaded_at=_parse_time(manifest.get("uploaded_at")),
                files=len(manifest.get("files", [])),
                state=BatchState.READY.value,
                updated_at=_now(),
            )
        )
        conn.execute(
            insert(batch_events).values(batch_id=batch_id, state=BatchState.READY.value, at=_now())
        )


def set_state(
    home: DataHome, batch_id: str, state: BatchState, detail: str | None = None, **fields: Any
) -> None:
    """Move a batch to ``state`` and append the change to its event trail."""
    eng = _engine(home)
    with eng.begin() as conn:
        conn.execute(
            update(batches)
            .where(batches.c.batch_id == batch_id)
            .values(state=state.value, updated_at=_now(), **fields)
        )
        conn.execute(
            insert(batch_events).values(
                batch_id=batch_id, state=state.value, at=_now(), detail=detail
            )
        )


def record_files(home: DataHome, batch_id: str, records: Iterable[FileRecord]) -> None:
    """Write the final disposition of files; rewriting a batch replaces its rows."""
    rows = [
        {
            "batch_id": batch_id,
            "file_no": r.file_no,
            "sha256_in": r.sha256_in,
            "size": r.size,
            "disposition": r.disposition.value,
            "reason": r.reason,
            "detail": r.detail,
            "sha256_out": r.sha256_out,
            "archive_path": r.archive_path,
            "recorded_at": _now(),
        }
        for r in records
    ]
    eng = _engine(home)
    with eng.begin() as conn:
        conn.execute(files.delete().where(files.c.batch_id == batch_id))
        if rows:
            conn.execute(insert(files), rows)


def archived_owner(home: DataHome, sop_instance_uid: str) -> dict[str, Any] | None:
    """Which batch archived this (pseudonymised) SOP Instance UID, and with what checksum."""
    with _engine(home).connect() as conn:
        row = conn.execute(
            select(archive_index).where(archive_index.c.sop_instance_uid == sop_instance_uid)
        ).first()
    return dict(row._mapping) if row else None


def claim_archive_slot(
    home: DataHome,
    sop_instance_uid: str,
    batch_id: str,
    file_no: int,
    sha256_out: str,
    archive_path: str,
) -> None:
    """Record that ``batch_id`` archived this instance (idempotent for the same batch)."""
    with _engine(home).begin() as conn:
        existing = conn.execute(
            select(archive_index.c.batch_id).where(
                archive_index.c.sop_instance_uid == sop_instance_uid
            )
        ).first()
        if existing is None:
            conn.execute(
                insert(archive_index).values(
                    sop_instance_uid=sop_instance_uid,
                    batch_id=batch_id,
                    file_no=file_no,
                    sha256_out=sha256_out,
                    archive_path=archive_path,
                )
            )


def batch_rows(home: DataHome) -> list[dict[str, Any]]:
    """One summary per batch, with file counts by disposition, oldest first."""
    eng = _engine(home)
    counts = (
        select(
            files.c.batch_id,
            files.c.disposition,
            func.count().label("n"),
        )
        .group_by(files.c.batch_id, files.c.disposition)
        .subquery()
    )
    with eng.connect() as conn:
        batch_list = conn.execute(
            select(batches).order_by(batches.c.uploaded_at, batches.c.batch_id)
        ).all()
        tallies: dict[str, dict[str, int]] = {}
        for batch_id, disposition, n in conn.execute(select(counts)).all():
            tallies.setdefault(batch_id, {})[disposition] = n
    result = []
    for row in batch_list:
        t = tallies.get(row.batch_id, {})
        result.append(
            {
                "batch_id": row.batch_id,
                "protocol_id": row.protocol_id,
                "site_id": row.site_id,
                "subject_id": row.subject_id,
                "visit": row.visit,
                "state": row.state,
                "reason": row.reason,
                "files": row.files,
                "archived": t.get(Disposition.ARCHIVED.value, 0),
                "quarantined": t.get(Disposition.QUARANTINED.value, 0),
                "duplicates": t.get(Disposition.DUPLICATE.value, 0),
            }
        )
    return result


def batch_row(home: DataHome, batch_id: str) -> dict[str, Any] | None:
    """The ledger's row for one batch (times as UTC-aware datetimes)."""
    with _engine(home).connect() as conn:
        row = conn.execute(select(batches).where(batches.c.batch_id == batch_id)).first()
    if row is None:
        return None
    return {k: utc(v) if isinstance(v, dt.datetime) else v for k, v in row._mapping.items()}


def state_times(home: DataHome, batch_id: str) -> dict[str, dt.datetime]:
    """When the batch first entered each state, as UTC-aware datetimes."""
    query = (
        select(batch_events.c.state, func.min(batch_events.c.at))
        .where(batch_events.c.batch_id == batch_id)
        .group_by(batch_events.c.state)
    )
    with _engine(home).connect() as conn:
        return {state: utc(at) for state, at in conn.execute(query).all()}


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (SQLite hands back naive UTC values)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def file_rows(home: DataHome, batch_id: str | None = None) -> list[dict[str, Any]]:
    """File dispositions, for one batch or all."""
    query = select(files).order_by(files.c.batch_id, files.c.file_no)
    if batch_id is not None:
        query = query.where(files.c.batch_id == batch_id)
    with _engine(home).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query).all()]


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value))
