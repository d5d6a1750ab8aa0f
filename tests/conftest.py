"""Shared fixtures: a fresh data home per test, the DEMO-01 protocol, a synthetic trial."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy

from pipeline import enrollment
from pipeline.home import DataHome, data_home
from pipeline.protocol import Protocol, load_protocol
from pipeline.synth import SeriesShape, SyntheticTrial, make_trial

SMALL = SeriesShape(rows=32, columns=32, slices=3)
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    from pipeline import db

    name = f"trialpipe_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        db.engine(f"{POSTGRES}/{name}").dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def home(tmp_path: Path) -> DataHome:
    return data_home(tmp_path / "home").ensure()


@pytest.fixture(scope="session")
def protocol() -> Protocol:
    return load_protocol("DEMO-01")


@pytest.fixture
def trial(tmp_path: Path, protocol: Protocol) -> SyntheticTrial:
    """One subject per site, BASELINE and WEEK12, small images, with the bad cases."""
    return make_trial(tmp_path / "trial", protocol, subjects_per_site=1, shape=SMALL)


@pytest.fixture
def enrolled(home: DataHome, protocol: Protocol, trial: SyntheticTrial) -> DataHome:
    enrollment.import_csv(home, protocol, trial.enrollment_csv)
    return home


def phi_leaks(root: Path, values: list[str], boundary=("inbox", "quarantine", "restricted")):
    """(file, value) pairs for planted PHI found in any file under ``root`` outside the
    boundary folders; binary files (SQLite DBs, Parquet, DICOM) are searched as bytes."""
    # Whole words only, as a reader would see them: "MARIA" is a name, "mariadb" is not.
    needles = [
        (
            v,
            re.compile(
                rb"(?<![a-z0-9])" + re.escape(v.lower().encode("latin-1")) + rb"(?![a-z0-9])"
            ),
        )
        for v in values
    ]
    leaks = []
    for path in root.rglob("*"):
        if not path.is_file() or path.relative_to(root).parts[0] in boundary:
            continue
        data = path.read_bytes().lower()
        leaks += [(str(path.relative_to(root)), v) for v, needle in needles if needle.search(data)]
    return leaks
