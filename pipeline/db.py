"""SQLAlchemy engines for the ledger and the restricted store (SQLite or PostgreSQL)."""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, MetaData, Table, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert


@lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    """One engine per URL per process. SQLite gets WAL and a long busy timeout because
    several Airflow task processes write the same file at once. Statement parameters are
    never quoted in an error: they can be original UIDs, and errors reach task logs. (A
    PostgreSQL server's own DETAIL line on a duplicate key still names the key; the keys
    of trialpipe's PostgreSQL tables are pseudonymised.)"""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return eng
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


def insert_if_absent(conn: Connection, table: Table) -> Insert:
    """An INSERT into ``table`` that skips each row whose primary key is already there
    (ON CONFLICT DO NOTHING, on SQLite and PostgreSQL), so writers adding the same rows at
    once never collide: on PostgreSQL the second waits for the first, then skips."""
    # Imported here: only a PostgreSQL deployment loads SQLAlchemy's PostgreSQL dialect
    # (a tenth of a second of every process's start-up otherwise).
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=list(table.primary_key.columns))


_created: set[tuple[str, int]] = set()


def ready(url: str, metadata: MetaData) -> Engine:
    """The engine for ``url`` with ``metadata``'s tables created (once per process)."""
    eng = engine(url)
    key = (url, id(metadata))
    if key not in _created:
        _create_tables(eng, metadata)
        _created.add(key)
    return eng


def _create_tables(eng: Engine, metadata: MetaData, attempts: int = 5) -> None:
    """Create the tables that do not exist yet. Several processes starting on a new
    database at once all see a table missing and all create it. On PostgreSQL they take
    turns under an advisory lock (its DDL is transactional; a concurrent CREATE OR REPLACE
    FUNCTION would fail); elsewhere the losers are told a table exists and look again."""
    if eng.dialect.name == "postgresql":
        with eng.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})
            metadata.create_all(conn, checkfirst=True)
        return
    for attempt in range(attempts):
        try:
            metadata.create_all(eng, checkfirst=True)
            return
        except DBAPIError as error:
            if "already exists" not in str(error.orig).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


_DDL_LOCK = int.from_bytes(b"trialddl", "big") >> 1  # any key, the same in every process
