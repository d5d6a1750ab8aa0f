"""The protocol's enrollment (randomization) list: who is in the trial, at which site, in
which arm, randomized when. Imported from the trial's CSV into the restricted store."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select

from pipeline.home import DataHome
from pipeline.protocol import Protocol
from pipeline.restricted import enrollment, store

COLUMNS = ("site_id", "subject_id", "arm", "randomization_date")


class EnrollmentError(ValueError):
    """The enrollment list cannot be imported as given."""


@dataclass(frozen=True)
class Enrollee:
    subject_id: str
    site_id: str
    arm: str
    randomization_date: dt.date


@dataclass(frozen=True)
class ImportResult:
    added: int
    unchanged: int


def import_csv(home: DataHome, protocol: Protocol, csv_path: Path) -> ImportResult:
    """Import the enrollment list; re-importing the same rows is a no-op.

    The whole file is refused (nothing written) if any row is invalid, names an unknown
    site or arm, or would move an already enrolled subject to another arm or site.
    """
    rows = _read_rows(protocol, csv_path)
    eng = store(home)
    added = unchanged = 0
    with eng.begin() as conn:
        existing = {
            r.subject_id: r
            for r in conn.execute(
                select(enrollment).where(enrollment.c.protocol_id == protocol.protocol_id)
            ).all()
        }
        new_rows = []
        for line_no, row in rows:
            old = existing.get(row.subject_id)
            if old is None:
                new_rows.append(row)
                existing[row.subject_id] = row  # a repeat inside the file must agree too
                continue
            for attr, what in (
                ("arm", "arm"),
                ("site_id", "site"),
                ("randomization_date", "randomization date"),
            ):
                if getattr(old, attr) != getattr(row, attr):
                    raise EnrollmentError(
                        f"line {line_no}: subject {row.subject_id} is already enrolled with "
                        f"another {what}; a subject's {what} cannot change"
                    )
            unchanged += 1
        if new_rows:
            conn.execute(
                insert(enrollment),
                [
                    {
                        "protocol_id": protocol.protocol_id,
                        "subject_id": r.subject_id,
                        "site_id": r.site_id,
                        "arm": r.arm,
                        "randomization_date": r.randomization_date,
                    }
                    for r in new_rows
                ],
            )
            added = len(new_rows)
    return ImportResult(added=added, unchanged=unchanged)


def lookup(home: DataHome, protocol_id: str, subject_id: str) -> Enrollee | None:
    """The enrolled subject, or None if the subject is not on the list."""
    with store(home).connect() as conn:
        row = conn.execute(
            select(enrollment).where(
                enrollment.c.protocol_id == protocol_id, enrollment.c.subject_id == subject_id
            )
        ).first()
    if row is None:
        return None
    return Enrollee(row.subject_id, row.site_id, row.arm, row.randomization_date)


def _read_rows(protocol: Protocol, csv_path: Path) -> list[tuple[int, Enrollee]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise EnrollmentError(f"cannot read {csv_path}: {error.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise EnrollmentError(f"missing column(s): {', '.join(missing)}; expected {COLUMNS}")
    rows: list[tuple[int, Enrollee]] = []
    for line_no, raw in enumerate(reader, start=2):
        values = {c: (raw.get(c) or "").strip() for c in COLUMNS}
        if not all(values.values()):
            raise EnrollmentError(f"line {line_no}: every column needs a value")
        if values["site_id"] not in protocol.sites:
            raise EnrollmentError(f"line {line_no}: unknown site {values['site_id']!r}")
        if values["arm"] not in protocol.arms:
            raise EnrollmentError(f"line {line_no}: unknown arm {values['arm']!r}")
        try:
            randomized = dt.date.fromisoformat(values["randomization_date"])
        except ValueError:
            raise EnrollmentError(
                f"line {line_no}: randomization_date must be YYYY-MM-DD"
            ) from None
        rows.append(
            (line_no, Enrollee(values["subject_id"], values["site_id"], values["arm"], randomized))
        )
    return rows


def enrolled(home: DataHome, protocol_id: str) -> list[Enrollee]:
    """Every subject on the protocol's randomization list, by subject ID."""
    with store(home).connect() as conn:
        rows = conn.execute(
            select(enrollment)
            .where(enrollment.c.protocol_id == protocol_id)
            .order_by(enrollment.c.subject_id)
        ).all()
    return [Enrollee(r.subject_id, r.site_id, r.arm, r.randomization_date) for r in rows]
