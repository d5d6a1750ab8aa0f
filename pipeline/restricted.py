"""The restricted store (``restricted/trial.sqlite``): enrollment, crosswalk, patient links.

This is inside the de-identification boundary: it holds randomization dates, the mapping
from original UIDs to pseudonyms and keyed fingerprints of the patients behind subjects.
Nothing here may be copied into the ledger, the Parquet tables or the archive.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from sqlalchemy import Column, Date, MetaData, String, Table, select
from sqlalchemy.engine import Engine

from pipeline import atomic, db
from pipeline.home import DataHome

metadata = MetaData()

enrollment = Table(
    "enrollment",
    metadata,
    Column("protocol_id", String(64), primary_key=True),
    Column("subject_id", String(64), primary_key=True),
    Column("site_id", String(64), nullable=False),
    Column("arm", String(64), nullable=False),
    Column("randomization_date", Date, nullable=False),
)

crosswalk = Table(
    "crosswalk",
    metadata,
    Column("protocol_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),  # subject, study, series, instance
    Column("original", String(128), primary_key=True),
    Column("pseudonym", String(128), nullable=False),
)

patient_links = Table(
    "patient_links",
    metadata,
    Column("protocol_id", String(64), primary_key=True),
    Column("subject_id", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("first_batch_id", String(128), nullable=False),
)


def store(home: DataHome) -> Engine:
    """The restricted store's engine, its tables created."""
    home.restricted.mkdir(parents=True, exist_ok=True)
    return db.ready(home.restricted_url, metadata)


def record_crosswalk(home: DataHome, protocol_id: str, entries: dict[tuple[str, str], str]) -> None:
    """Remember original -> pseudonym pairs (idempotent: a pair is written once).

    Insert-if-absent, so two batches of one upload de-identified at once, both adding the
    same study and series UIDs, both succeed. Sorted, so two PostgreSQL transactions take
    their row locks in the same order and never deadlock."""
    if not entries:
        return
    rows = [
        {"protocol_id": protocol_id, "kind": kind, "original": original, "pseudonym": new}
        for (kind, original), new in sorted(entries.items())
    ]
    with store(home).begin() as conn:
        conn.execute(db.insert_if_absent(conn, crosswalk), rows)


def link_patient(
    home: DataHome, protocol_id: str, subject_id: str, fingerprint: str, batch_id: str
) -> bool:
    """Tie a subject to the patient of its first batch; False if a later batch differs."""
    eng = store(home)
    with eng.begin() as conn:
        row = conn.execute(
            select(patient_links.c.fingerprint).where(
                patient_links.c.protocol_id == protocol_id,
                patient_links.c.subject_id == subject_id,
            )
        ).first()
        if row is None:
            conn.execute(
                patient_links.insert().values(
                    protocol_id=protocol_id,
                    subject_id=subject_id,
                    fingerprint=fingerprint,
                    first_batch_id=batch_id,
                )
            )
            return True
        return row.fingerprint == fingerprint


def export_crosswalk(home: DataHome, protocol_id: str, target: Path) -> int:
    """Write the crosswalk as ``id_old,id_new`` CSV (the form TCIA's MIDI-B validation reads)
    for a reviewer; return the number of pairs. The file holds original identifiers: it is
    for the restricted side only."""
    with store(home).connect() as conn:
        rows = conn.execute(
            select(crosswalk.c.original, crosswalk.c.pseudonym)
            .where(crosswalk.c.protocol_id == protocol_id)
            .order_by(crosswalk.c.kind, crosswalk.c.original)
        ).all()

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id_old", "id_new"])
            writer.writerows(rows)
        os.chmod(tmp, 0o600)

    atomic.write_with(target, write)
    return len(rows)
