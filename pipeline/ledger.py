"""The audit ledger: append-only record of every batch and of where every uploaded file went.

Trials are regulated (GCP; 21 CFR Part 11 asks for audit trails), so nothing here is ever
updated or deleted: a batch's state changes and a file's dispositions are events appended
with a timestamp, and the current state is the latest event. Database triggers refuse
UPDATE, DELETE and (PostgreSQL) TRUNCATE on every ledger table (SQLite in the embedded mode,
PostgreSQL in production: the same SQLAlchemy schema; ``$TRIALPIPE_LEDGER_URL`` selects the
database).

Holds no PHI: batches are named by generated IDs, files by their number in the batch and
their checksums, never by their original names or contents. Subject and visit are recorded
only once the subject is confirmed on the randomization list.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    DDL,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine

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
    Column("uploader", String(128)),
    Column("uploaded_at", DateTime(timezone=True)),
    Column("files", Integer, nullable=False, default=0),
    Column("released_from", String(128)),
    Column("registered_at", DateTime(timezone=True), nullable=False),
)

batch_events = Table(
    "batch_events",
    metadata,
    Column("event_id", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(128), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(48)),
    Column("detail", String(500)),
    Column("subject_id", String(64)),
    Column("visit", String(64)),
    Column("recipe_version", String(64)),
    Column("code_version", String(32)),
    Column("dag_run_id", String(250)),
)

file_events = Table(
    "file_events",
    metadata,
    Column("event_id", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(128), nullable=False, index=True),
    Column("file_no", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("disposition", String(16), nullable=False),
    Column("reason", String(48)),
    Column("detail", String(500)),
    Column("sha256_in", String(64)),
    Column("size", Integer),
    Column("sha256_out", String(64)),
    Column("archive_path", String(500)),
    Column("recipe_version", String(64)),
    Column("code_version", String(32)),
    Column("dag_run_id", String(250)),
)

archive_index = Table(
    "archive_index",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("batch_id", String(128), nullable=False),
    Column("file_no", Integer, nullable=False),
    Column("sha256_out", String(64), nullable=False),
    Column("archive_path", String(500), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
)

_REFUSAL = "the audit ledger is append-only"
event.listen(
    metadata,
    "before_create",
    DDL(
        "CREATE OR REPLACE FUNCTION trialpipe_append_only() RETURNS trigger AS $$ "
        f"BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $$ LANGUAGE plpgsql"
    ).execute_if(dialect="postgresql"),
)
for _table in (batches, batch_events, file_events, archive_index):
    event.listen(
        _table,
        "after_create",
        DDL(
            f"CREATE TRIGGER {_table.name}_append_only BEFORE UPDATE OR DELETE ON {_table.name}"
            " FOR EACH ROW EXECUTE FUNCTION trialpipe_append_only()"
        ).execute_if(dialect="postgresql"),
    )
    # Row triggers never fire on TRUNCATE, which empties a table without touching a row.
    event.listen(
        _table,
        "after_create",
        DDL(
            f"CREATE TRIGGER {_table.name}_no_truncate BEFORE TRUNCATE ON {_table.name}"
            " FOR EACH STATEMENT EXECUTE FUNCTION trialpipe_append_only()"
        ).execute_if(dialect="postgresql"),
    )
    for _verb in ("UPDATE", "DELETE"):
        event.listen(
            _table,
            "after_create",
            DDL(
                f"CREATE TRIGGER {_table.name}_no_{_verb.lower()} BEFORE {_verb} ON {_table.name}"
                f" BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
            ).execute_if(dialect="sqlite"),
        )


@dataclass(frozen=True)
class FileRecord:
    """The disposition of one uploaded file, as finalize records it."""

    file_no: int
    sha256_in: str | None
    size: int | None
    disposition: Disposition
    reason: str | None = None
    detail: str | None = None
    sha256_out: str | None = None
    archive_path: str | None = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _engine(home: DataHome) -> Engine:
    # Created before any table, so the PostgreSQL trigger function exists for the triggers.
    return db.ready(home.ledger_url, metadata)


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (SQLite hands back naive UTC values)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _row(mapping: Any) -> dict[str, Any]:
    return {k: utc(v) if isinstance(v, dt.datetime) else v for k, v in dict(mapping).items()}


def register_batch(
    home: DataHome,
    batch_id: str,
    protocol_id: str,
    site_id: str,
    files: int,
    uploader: str | None = None,
    uploaded_at: dt.datetime | str | None = None,
    released_from: str | None = None,
    subject_id: str | None = None,
    visit: str | None = None,
) -> None:
    """Record a batch once (READY); a second call for the same batch changes nothing.
    Pass ``subject_id`` and ``visit`` only when checked against the randomization list."""
    with _engine(home).begin() as conn:
        if conn.execute(select(batches.c.batch_id).where(batches.c.batch_id == batch_id)).first():
            return
        conn.execute(
            insert(batches).values(
                batch_id=batch_id,
                protocol_id=protocol_id,
                site_id=site_id,
                uploader=uploader,
                uploaded_at=_parse_time(uploaded_at),
                files=files,
                released_from=released_from,
                registered_at=_now(),
            )
        )
        conn.execute(
            insert(batch_events).values(
                batch_id=batch_id,
                at=_now(),
                state=BatchState.READY.value,
                subject_id=subject_id,
                visit=visit,
            )
        )


def _latest_batch_event(conn: Connection, batch_id: str) -> Any:
    return conn.execute(
        select(batch_events)
        .where(batch_events.c.batch_id == batch_id)
        .order_by(batch_events.c.event_id.desc())
        .limit(1)
    ).first()


def set_state(
    home: DataHome,
    batch_id: str,
    state: BatchState,
    detail: str | None = None,
    **fields: Any,
) -> None:
    """Append a state change of the batch. Repeating the current state with the same
    reason (a retried task) appends nothing. ``fields``: reason, subject_id, visit,
    recipe_version, code_version, dag_run_id."""
    with _engine(home).begin() as conn:
        latest = _latest_batch_event(conn, batch_id)
        if (
            latest is not None
            and latest.state == state.value
            and latest.reason == fields.get("reason")
            and latest.detail == detail
        ):
            return
        conn.execute(
            insert(batch_events).values(
                batch_id=batch_id, at=_now(), state=state.value, detail=detail, **fields
            )
        )


def _current_files(conn: Connection, batch_id: str | None = None) -> list[Any]:
    latest = select(
        file_events.c.batch_id, file_events.c.file_no, func.max(file_events.c.event_id).label("id")
    ).group_by(file_events.c.batch_id, file_events.c.file_no)
    if batch_id is not None:
        latest = latest.where(file_events.c.batch_id == batch_id)
    ids = latest.subquery()
    return conn.execute(
        select(file_events)
        .join(ids, file_events.c.event_id == ids.c.id)
        .order_by(file_events.c.batch_id, file_events.c.file_no)
    ).all()


_COMPARED = ("disposition", "reason", "detail", "sha256_in", "sha256_out", "archive_path")


def record_files(
    home: DataHome,
    batch_id: str,
    records: Iterable[FileRecord],
    **versions: str | None,
) -> int:
    """Append each file's disposition unless it is already the file's current one (a
    retried finalize appends nothing); return how many events were appended.
    ``versions``: recipe_version, code_version, dag_run_id."""
    with _engine(home).begin() as conn:
        current = {r.file_no: r for r in _current_files(conn, batch_id)}
        rows = []
        for record in records:
            values = {
                "file_no": record.file_no,
                "disposition": record.disposition.value,
                "reason": record.reason,
                "detail": record.detail,
                "sha256_in": record.sha256_in,
                "size": record.size,
                "sha256_out": record.sha256_out,
                "archive_path": record.archive_path,
            }
            before = current.get(record.file_no)
            if before is not None and all(getattr(before, k) == values[k] for k in _COMPARED):
                continue
            rows.append({"batch_id": batch_id, "at": _now(), **values, **versions})
        if rows:
            conn.execute(insert(file_events), rows)
    return len(rows)


@dataclass(frozen=True)
class ArchiveSlot:
    """One instance's place in the arm archive, as a batch asks to hold it."""

    sop_instance_uid: str
    file_no: int
    sha256_out: str
    archive_path: str


@dataclass(frozen=True)
class SlotHolder:
    """The file holding an instance's archive slot: the first that reserved it."""

    batch_id: str
    file_no: int
    sha256_out: str


# Bound parameters per statement, well below SQLite's limit.
_CHUNK = 500


def reserve_archive_slots(
    home: DataHome, batch_id: str, slots: Iterable[ArchiveSlot]
) -> dict[str, SlotHolder]:
    """Reserve each instance's archive slot for ``batch_id`` unless a file already holds
    it; return every asked instance's holder (this batch's file, or the earlier one).

    One transaction of insert-if-absent under the unique SOP Instance UID, so of two
    batches deciding at once only one can hold an instance, and the other sees it held
    (SQLite takes the database's write lock at the first insert; PostgreSQL makes the
    second insert wait for the first transaction, then skip its row). Repeating a
    reservation (a retried or resumed task) finds the batch's own. Sorted by UID so two
    PostgreSQL transactions take their row locks in the same order and never deadlock.
    """
    wanted = sorted(slots, key=lambda slot: slot.sop_instance_uid)
    if not wanted:
        return {}
    holders: dict[str, SlotHolder] = {}
    with _engine(home).begin() as conn:
        for start in range(0, len(wanted), _CHUNK):
            rows = [
                {**asdict(slot), "batch_id": batch_id, "at": _now()}
                for slot in wanted[start : start + _CHUNK]
            ]
            conn.execute(db.insert_if_absent(conn, archive_index), rows)
        for start in range(0, len(wanted), _CHUNK):
            uids = [slot.sop_instance_uid for slot in wanted[start : start + _CHUNK]]
            for row in conn.execute(
                select(
                    archive_index.c.sop_instance_uid,
                    archive_index.c.batch_id,
                    archive_index.c.file_no,
                    archive_index.c.sha256_out,
                ).where(archive_index.c.sop_instance_uid.in_(uids))
            ):
                holders[row.sop_instance_uid] = SlotHolder(
                    row.batch_id, row.file_no, row.sha256_out
                )
    return holders


def _summaries(conn: Connection, batch_id: str | None = None) -> list[dict[str, Any]]:
    query = select(batches).order_by(batches.c.registered_at, batches.c.batch_id)
    if batch_id is not None:
        query = query.where(batches.c.batch_id == batch_id)
    registered = conn.execute(query).all()
    tallies: dict[str, dict[str, int]] = {}
    for row in _current_files(conn, batch_id):
        counts = tallies.setdefault(row.batch_id, {})
        counts[row.disposition] = counts.get(row.disposition, 0) + 1
    events: dict[str, list[Any]] = {}
    event_query = select(batch_events).order_by(batch_events.c.event_id)
    if batch_id is not None:
        event_query = event_query.where(batch_events.c.batch_id == batch_id)
    for row in conn.execute(event_query).all():
        events.setdefault(row.batch_id, []).append(row)
    result = []
    for row in registered:
        trail = events.get(row.batch_id, [])
        latest = trail[-1] if trail else None
        confirmed = next((e for e in reversed(trail) if e.subject_id), None)
        counts = tallies.get(row.batch_id, {})
        result.append(
            {
                **_row(row._mapping),
                "subject_id": confirmed.subject_id if confirmed else None,
                "visit": confirmed.visit if confirmed else None,
                "state": latest.state if latest else BatchState.READY.value,
                "reason": latest.reason if latest else None,
                "recipe_version": next(
                    (e.recipe_version for e in reversed(trail) if e.recipe_version), None
                ),
                "dag_run_id": next((e.dag_run_id for e in reversed(trail) if e.dag_run_id), None),
                "updated_at": utc(latest.at) if latest else None,
                "archived": counts.get(Disposition.ARCHIVED.value, 0),
                "quarantined": counts.get(Disposition.QUARANTINED.value, 0),
                "duplicates": counts.get(Disposition.DUPLICATE.value, 0),
                "released": counts.get(Disposition.RELEASED.value, 0),
            }
        )
    return result


def batch_summaries(home: DataHome) -> list[dict[str, Any]]:
    """One current summary per batch, with file counts by disposition, oldest first."""
    with _engine(home).connect() as conn:
        return _summaries(conn)


def batch_summary(home: DataHome, batch_id: str) -> dict[str, Any] | None:
    """The current summary of one batch (times as UTC-aware datetimes)."""
    with _engine(home).connect() as conn:
        rows = _summaries(conn, batch_id)
    return rows[0] if rows else None


def file_rows(home: DataHome, batch_id: str | None = None) -> list[dict[str, Any]]:
    """Each file's current disposition (its latest event), for one batch or all."""
    with _engine(home).connect() as conn:
        return [_row(r._mapping) for r in _current_files(conn, batch_id)]


def state_times(home: DataHome, batch_id: str) -> dict[str, dt.datetime]:
    """When the batch first entered each state, as UTC-aware datetimes."""
    query = (
        select(batch_events.c.state, func.min(batch_events.c.at))
        .where(batch_events.c.batch_id == batch_id)
        .group_by(batch_events.c.state)
    )
    with _engine(home).connect() as conn:
        return {state: utc(at) for state, at in conn.execute(query).all()}


def trail(home: DataHome, batch_id: str) -> dict[str, Any] | None:
    """Everything the ledger holds on a batch, in order: registration, every state
    change, every file event. None if the batch is unknown."""
    with _engine(home).connect() as conn:
        summary = _summaries(conn, batch_id)
        if not summary:
            return None
        events = conn.execute(
            select(batch_events)
            .where(batch_events.c.batch_id == batch_id)
            .order_by(batch_events.c.event_id)
        ).all()
        files = conn.execute(
            select(file_events)
            .where(file_events.c.batch_id == batch_id)
            .order_by(file_events.c.file_no, file_events.c.event_id)
        ).all()
        released_to = conn.execute(
            select(batches.c.batch_id).where(batches.c.released_from == batch_id)
        ).all()
    return {
        "batch": summary[0],
        "events": [_row(e._mapping) for e in events],
        "files": [_row(f._mapping) for f in files],
        "released_to": [r.batch_id for r in released_to],
    }


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))
